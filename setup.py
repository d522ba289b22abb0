"""The one thing pyproject.toml cannot declare without setuptools' experimental table: the optional C
extension that reads the runaway check's text and runs its detector (operator/tensorfleet/gateway/_textscan.c).
Where it cannot be compiled, the install goes on and the same checks run in Python."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tensorfleet.gateway._textscan", ["operator/tensorfleet/gateway/_textscan.c"],
                             optional=True)])

"""The one thing pyproject.toml cannot declare without setuptools' experimental table: the optional C
extension that extracts the runaway check's text (operator/tensorfleet/gateway/_textscan.c). Where it
cannot be compiled, the install goes on and the same extraction runs in Python."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tensorfleet.gateway._textscan", ["operator/tensorfleet/gateway/_textscan.c"],
                             optional=True)])

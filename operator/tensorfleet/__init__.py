"""tensorfleet: a Kubernetes operator for metered, autoscaled GPU inference of LLMs."""

__version__ = "0.1.0"

API_GROUP = "tensorfleet.io"
API_VERSION = "v1alpha1"
FIELD_MANAGER = "tensorfleet"

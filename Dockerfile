# syntax=docker/dockerfile:1
# One image for every tensorfleet process: the operator (`tensorfleet run`), the gateway sidecar in
# each serving pod (`tensorfleet gateway`) and the engine Jobs (`tensorfleet engine ...`).
# Multi-stage: the build stage installs tensorfleet and its dependencies into a virtual environment,
# the runtime stage is the slim Python base plus that environment. It runs as a non-root user and
# writes nothing outside /tmp, so it works with readOnlyRootFilesystem.
# The install steps are hack/image-install.sh, which tests/e2e/test_image.py also runs.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# A C compiler for the gateway's optional extension (operator/tensorfleet/gateway/_textscan.c): the
# runtime stage gets the compiled module, not the compiler. The distribution's current gcc is wanted.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY hack/image-install.sh /usr/local/bin/image-install
COPY pyproject.toml setup.py README.md ./
COPY crds ./crds
COPY examples/inferenceservice.yaml ./examples/inferenceservice.yaml
COPY operator ./operator
RUN image-install /opt/tensorfleet /src

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="tensorfleet" \
      org.opencontainers.image.description="Kubernetes operator, gateway and engine jobs for metered GPU inference of LLMs" \
      org.opencontainers.image.licenses="Apache-2.0"
# The same numeric user the chart and the rendered gateway containers run as.
RUN groupadd --system --gid 65532 tensorfleet \
    && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin tensorfleet
COPY --from=build /opt/tensorfleet /opt/tensorfleet
ENV PATH="/opt/tensorfleet/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 65532:65532
# 8000 gateway traffic, 9090 metrics (operator and gateway admin), 8080 operator liveness.
EXPOSE 8000 8080 9090
ENTRYPOINT ["tensorfleet"]
CMD ["--help"]

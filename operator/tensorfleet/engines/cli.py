"""``tensorfleet engine ...`` and ``tensorfleet model ...``: keys, the build Job, the init containers.

None of these commands talks to the Kubernetes API: they run in Jobs and init containers without
API rights and report through files (the termination message) and exit codes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import sys
from typing import Any, ClassVar

import click
import yaml

from tensorfleet import cli_files, config
from tensorfleet.config import setting

EXIT_FAILED = 1
EXIT_CORRUPT = 3  # the artifact does not match its digest: the operator rebuilds it
EXIT_TIMEOUT = 4


@dataclasses.dataclass(frozen=True)
class StoreSettings:
    ENV_PREFIX: ClassVar[str] = "TENSORFLEET_ENGINE_"

    store: str = setting("", "Engine store: file:///PATH or s3://BUCKET/PREFIX.")
    s3_endpoint: str | None = setting(None, "S3-compatible endpoint URL (MinIO, Ceph RGW, ...); unset for AWS S3.")
    s3_region: str | None = setting(None, "S3 region.")

    def open(self) -> Any:
        from tensorfleet.engines.store import open_store

        if not self.store:
            raise click.UsageError("--store (TENSORFLEET_ENGINE_STORE) is required")
        try:
            return open_store(self.store, self.s3_endpoint, self.s3_region)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)


@click.group()
def engine() -> None:
    """TensorRT-LLM engines: fingerprint keys, the build Job (ensure) and the serving init container (fetch)."""


@engine.command()
@click.option("-f", "--filename", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="An Engine, or an InferenceService with --gpu-product and --compute-capability.")
@click.option("--gpu-product", default=None, help="For an InferenceService: the nvidia.com/gpu.product to key for.")
@click.option("--compute-capability", default=None, help="For an InferenceService: MAJOR.MINOR of that product.")
@click.option("-o", "--output", type=click.Choice(["name", "fingerprint", "document", "yaml"]), default="name",
              show_default=True, help="name, the full sha256, the fingerprint document, or the Engine manifest.")
def key(filename: str, gpu_product: str | None, compute_capability: str | None, output: str) -> None:
    """Print the Engine name (or fingerprint) for FILE: the same inputs always give the same name."""
    from tensorfleet.api import crds, manifest_yaml
    from tensorfleet.api.types import InferenceService
    from tensorfleet.api.validation import validate_body
    from tensorfleet.engines import fingerprint

    text = cli_files.read_text(filename, "'-f' / '--filename'")
    try:
        docs = [d for d in manifest_yaml.load_all(text) if d]
    except yaml.YAMLError as exc:
        raise click.ClickException(f"{filename} is not valid YAML: {exc}") from None
    for doc in docs:
        kind = doc.get("kind") if isinstance(doc, dict) else None
        spec: dict[str, Any]
        namespace: str | None
        if kind == "InferenceService":
            if not gpu_product or not compute_capability:
                raise click.UsageError("an InferenceService needs --gpu-product and --compute-capability")
            problems = validate_body(doc)
            if problems:
                raise click.ClickException("\n".join(f"InferenceService: {e}" for e in problems))
            isvc = InferenceService.from_body(doc)
            if isvc.spec.engine is None:
                raise click.ClickException("InferenceService: spec.engine: Required value: the service builds no "
                                           "engine (set spec.engine, as runtime triton requires)")
            spec, namespace = fingerprint.engine_spec(isvc, gpu_product, compute_capability), isvc.namespace
        elif kind == "Engine":
            spec, namespace = doc.get("spec") or {}, (doc.get("metadata") or {}).get("namespace")
        else:
            raise click.ClickException(f"{filename}: expected kind Engine or InferenceService, got {kind!r}")
        errors = crds.validate({"apiVersion": "tensorfleet.io/v1alpha1", "kind": "Engine",
                                "metadata": {"name": "validating"}, "spec": spec})
        if errors:
            raise click.ClickException("\n".join(f"Engine: {e}" for e in errors))
        manifest = fingerprint.engine_manifest(spec, namespace)
        engine_key = fingerprint.key_of_body(manifest)
        if output == "name":
            click.echo(engine_key.name)
        elif output == "fingerprint":
            click.echo(engine_key.sha256)
        elif output == "document":
            click.echo(engine_key.canonical.decode())
        else:
            click.echo(yaml.safe_dump(manifest, sort_keys=False), nl=False)


@engine.command()
@click.option("--spec", "spec_json", required=True, envvar="TENSORFLEET_ENGINE_SPEC",
              help="The Engine spec as JSON (the operator renders it into the Job).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=pathlib.Path), default="/work", show_default=True)
@click.option("--timeout", "timeout", type=int, default=7200, show_default=True,
              help="Seconds one build may take (download, convert, trtllm-build).")
@click.option("--termination-log", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              default=None, help="Where to write the JSON outcome (the pod's terminationMessagePath).")
@click.option("--examples-dir", envvar="TRTLLM_EXAMPLES", default="/app/tensorrt_llm/examples", show_default=True,
              show_envvar=True, help="TensorRT-LLM's examples folder (convert_checkpoint.py, quantize.py).")
@config.click_options(StoreSettings)
def ensure(spec_json: str, workdir: pathlib.Path, timeout: int, termination_log: pathlib.Path | None,
           examples_dir: str, **options: Any) -> None:
    """Use the stored engine if it is complete and verifies; otherwise build, upload and commit it."""
    from tensorfleet.engines import models
    from tensorfleet.engines.ensure import TensorRTLLMBuilder, run_ensure

    _logging()
    settings = config.from_click(StoreSettings, options)
    spec = _valid_engine_spec(spec_json, termination_log)
    builder = TensorRTLLMBuilder(timeout_seconds=timeout, download=models.RetryPolicy(timeout_seconds=timeout),
                                 s3_endpoint=settings.s3_endpoint, examples_dir=examples_dir)
    outcome = run_ensure(spec, settings.open(), builder, workdir, termination_log, lock_timeout=timeout)
    click.echo(outcome.termination_message())
    sys.exit(outcome.exit_code)


def _valid_engine_spec(spec_json: str, termination_log: pathlib.Path | None) -> dict[str, Any]:
    """``--spec`` defaulted as the API server would, checked as the operator checks an Engine (CRD schema,
    then the trtllm-build options) before anything is downloaded or locked. A bad one is a usage error
    naming each field, also reported in the termination log (reason InvalidSpec) for the operator."""
    from tensorfleet.api import crds
    from tensorfleet.engines import trtllm

    try:
        spec = json.loads(spec_json)
    except ValueError as exc:
        problems = [f"--spec is not JSON: {exc}"]
    else:
        body = {"apiVersion": "tensorfleet.io/v1alpha1", "kind": "Engine", "metadata": {"name": "ensure"},
                "spec": spec}
        if not isinstance(spec, dict):
            problems = [f"spec: Invalid value: must be a JSON object (the Engine spec), got {type(spec).__name__}"]
        else:
            errors = crds.validate(body) or trtllm.build_option_errors(spec.get("buildOptions") or {})
            problems = [str(e) for e in errors]
    if problems:
        message = "\n".join(problems)
        _report(termination_log, {"result": "failed", "reason": "InvalidSpec", "message": message})
        raise click.UsageError(f"--spec is not a valid Engine spec:\n{message}")
    return dict(crds.default(body)["spec"])


def _check_hex(length: int, prefix: str = "") -> Any:
    """A click callback: the value must be ``prefix`` followed by ``length`` lower-case hex digits."""
    def check(ctx: click.Context, param: click.Parameter, value: str) -> str:
        digits = value[len(prefix):] if value.startswith(prefix) else ""
        if len(digits) != length or any(ch not in "0123456789abcdef" for ch in digits):
            raise click.BadParameter(f"{value!r}: must be {prefix}{length} lower-case hex digits")
        return value
    return check


@engine.command()
@click.option("--fingerprint", required=True, callback=_check_hex(64),
              help="The Engine's status.fingerprint (64 hex digits).")
@click.option("--sha256", "sha256", required=True, callback=_check_hex(64, "sha256:"),
              help="The artifact digest the Engine recorded (sha256:<64 hex>).")
@click.option("--dest", type=click.Path(file_okay=False, path_type=pathlib.Path), default="/engines", show_default=True)
@click.option("--max-batch-size", type=int, default=64, show_default=True)
@click.option("--timeout", type=int, default=1800, show_default=True, help="Seconds to keep retrying transient errors.")
@click.option("--termination-log", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              default=pathlib.Path("/dev/termination-log"), show_default=True)
@config.click_options(StoreSettings)
def fetch(fingerprint: str, sha256: str, dest: pathlib.Path, max_batch_size: int, timeout: int,
          termination_log: pathlib.Path, **options: Any) -> None:
    """Copy the engine into DEST, verifying every byte, and write Triton's model repository."""
    from tensorfleet.engines import models
    from tensorfleet.engines.fetch import CorruptArtifact, MissingArtifact, fetch_engine
    from tensorfleet.engines.store import StoreError, is_transient

    _logging()
    store = config.from_click(StoreSettings, options).open()
    policy = models.RetryPolicy(timeout_seconds=timeout)
    report: dict[str, Any] = {"fingerprint": fingerprint, "sha256": sha256}

    def attempt() -> None:
        try:
            fetch_engine(store, fingerprint, sha256, dest, max_batch_size)
        except OSError as exc:
            if is_transient(exc):  # a flaky network filesystem: retried like the store's own errors
                raise StoreError(str(exc)) from exc
            raise  # EACCES, ENOSPC, a read-only --dest...: retrying would only delay the report

    try:
        models.with_retries(f"fetching engine {fingerprint}", attempt, policy, retried=(StoreError, MissingArtifact))
    except OSError as exc:
        _report(termination_log, {**report, "result": "failed", "message": str(exc)})
        click.echo(f"engine-fetch: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    except CorruptArtifact as exc:
        _report(termination_log, {**report, "result": "corrupt", "message": str(exc)})
        click.echo(f"engine-fetch: CORRUPT ARTIFACT, refusing to serve it: {exc}", err=True)
        sys.exit(EXIT_CORRUPT)
    except models.DownloadTimeout as exc:
        _report(termination_log, {**report, "result": "timeout", "message": str(exc)})
        click.echo(f"engine-fetch: {exc}", err=True)
        sys.exit(EXIT_TIMEOUT)
    _report(termination_log, {**report, "result": "verified"})
    click.echo(f"engine {fingerprint} verified ({sha256}) in {dest}")


@engine.command()
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=pathlib.Path))
def digest(directory: pathlib.Path) -> None:
    """Print the digest of DIRECTORY (the value of spec.model.digest for a folder of weights)."""
    from tensorfleet.engines.store import StoreError, digest_directory

    try:
        value, _ = digest_directory(directory, exclude=(".tensorfleet-verified", ".cache"))
    except StoreError as exc:  # a symbolic link: a Hugging Face cache snapshot links every file into blobs/
        raise click.ClickException(f"DIRECTORY: {exc}; digest a folder holding the files themselves, e.g. "
                                   "huggingface-cli download ORG/NAME --revision REV --local-dir DIR") from None
    except OSError as exc:
        raise click.ClickException(f"DIRECTORY: {exc}") from None
    click.echo(value)


def _report(path: pathlib.Path | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    with contextlib.suppress(OSError):  # outside a pod there may be no termination log
        path.write_text(json.dumps(data, sort_keys=True)[:3800])


@click.group()
def model() -> None:
    """Model weights: download with retries and verify their digest (vLLM's model-fetch init container)."""


@model.command("fetch")
@click.option("--uri", required=True, help="hf://ORG/NAME@REV, s3://BUCKET/PATH or pvc://CLAIM/PATH.")
@click.option("--digest", "digest_", default=None, help="sha256:<64 hex> the files must have.")
@click.option("--dest", type=click.Path(file_okay=False, path_type=pathlib.Path), required=True)
@click.option("--timeout", type=int, default=3600, show_default=True)
@click.option("--s3-endpoint", envvar="TENSORFLEET_MODEL_S3_ENDPOINT", default=None)
@click.option("--termination-log", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              default=pathlib.Path("/dev/termination-log"), show_default=True)
def model_fetch(uri: str, digest_: str | None, dest: pathlib.Path, timeout: int, s3_endpoint: str | None,
                termination_log: pathlib.Path) -> None:
    """Download the weights into DEST (retrying with backoff until TIMEOUT) and verify DIGEST."""
    from tensorfleet.api.types import ModelSource
    from tensorfleet.engines import models

    _logging()
    try:
        ModelSource.parse(uri)
    except ValueError as exc:  # the operator validated it: a Pod edited by hand, or the command run by a person
        _report(termination_log, {"result": "failed", "reason": "InvalidURI", "uri": uri, "message": str(exc)})
        click.echo(f"model-fetch: --uri: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    try:
        local = models.fetch_model(uri, dest, digest_, models.RetryPolicy(timeout_seconds=timeout), s3_endpoint)
    except models.DigestMismatch as exc:
        _report(termination_log, {"result": "corrupt", "uri": uri, "message": str(exc)})
        click.echo(f"model-fetch: {exc}", err=True)
        sys.exit(EXIT_CORRUPT)
    except models.DownloadFailed as exc:  # retrying cannot help: say what to change, now
        _report(termination_log, {"result": "failed", "reason": exc.reason, "uri": uri, "message": str(exc)})
        click.echo(f"model-fetch: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    except models.DownloadTimeout as exc:
        _report(termination_log, {"result": "timeout", "uri": uri, "message": str(exc)})
        click.echo(f"model-fetch: {exc}", err=True)
        sys.exit(EXIT_TIMEOUT)
    _report(termination_log, {"result": "verified", "uri": uri, "digest": digest_})
    click.echo(f"model {uri} ready in {local}")

"""Job settings, and the checks that run before any expensive work (exit code 2 on failure)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from chameleon_core import ChameleonConfig, ChameleonError, SamplingParams
from chameleon_core.checkpoint import checkpoint_files, parse_dtype
from chameleon_core.processor import ChameleonProcessor
from pipeline.storage import StorageError, StorageOptions, fs_path, is_remote

DEFAULT_PROMPT = "<image>Describe this image in one sentence."
IMAGE_PLACEHOLDER = "<image>"


class OptionsError(ValueError):
    """A flag or input schema problem found before the job starts; the job exits with code 2."""


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    text_completion: bool = False

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_k=self.top_k, top_p=self.top_p, seed=self.seed)


@dataclass(frozen=True)
class CaptionOptions:
    inputs: tuple[str, ...]
    output: str
    model: str
    id_column: str = "id"
    image_column: str = "image"
    prompt: str = DEFAULT_PROMPT
    prompt_column: str | None = None
    # Columns whose values fill `{name}` fields of the prompt template (the VQA job uses {question}).
    template_columns: tuple[str, ...] = ()
    keep_columns: tuple[str, ...] = ()
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    batch_size: int = 8
    sort_window: int = 4  # rows are length-sorted within batch_size * sort_window
    replicas: tuple[int, int] = (1, 1)
    tp: int = 1
    cpu_workers: tuple[int, int] = (1, 2)
    device: str = "auto"
    dtype: str = "auto"
    limit: int | None = None
    rows_per_file: int = 1000
    save_token_ids: bool = False
    storage: StorageOptions = field(default_factory=StorageOptions)
    allow_local_paths: bool = False
    force: bool = False
    max_image_pixels: int = 64_000_000
    max_image_bytes: int = 64 * 1024 * 1024
    torch_threads: int | None = None
    compile: bool = False
    # Images whose VQ tokens each replica caches (LRU by content hash); 0 keeps none between batches.
    # It never changes the output, so it is not part of job_settings().
    vq_cache_size: int = 4096
    # Resolved by validation (never set by users):
    resolved_device: str = ""
    resolved_dtype: str = ""

    def job_settings(self) -> dict[str, Any]:
        """What determines the output: a resumed run must match these (credentials never included)."""
        return {
            "model": model_fingerprint(self.model),
            "prompt": self.prompt,
            "prompt_column": self.prompt_column,
            "template_columns": list(self.template_columns),
            "id_column": self.id_column,
            "image_column": self.image_column,
            "keep_columns": list(self.keep_columns),
            "generation": asdict(self.generation),
            "dtype": self.resolved_dtype or self.dtype,
            "save_token_ids": self.save_token_ids,
            "rows_per_file": self.rows_per_file,
            "limit": self.limit,
        }


def model_fingerprint(model_dir: str) -> dict[str, Any]:
    """Name plus a hash of config.json and the weight index, cheap to compute for any model size."""
    path = Path(model_dir)
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.json", "preprocessor_config.json"):
        file = path / name
        if file.is_file():
            digest.update(name.encode())
            digest.update(file.read_bytes())
    single = path / "model.safetensors"
    if single.is_file():
        stat = single.stat()
        digest.update(f"{stat.st_size}".encode())
    return {"name": path.name, "path": str(path), "sha256": digest.hexdigest()[:16]}


def parse_range(text: str, flag: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in str(text).split(",")]
    except ValueError:
        raise OptionsError(f"{flag} {text!r}: expected N or MIN,MAX (integers)") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or parts[0] < 1 or parts[1] < parts[0]:
        raise OptionsError(f"{flag} {text!r}: expected N or MIN,MAX with 1 <= MIN <= MAX")
    return parts[0], parts[1]


def check_numbers(options: CaptionOptions) -> None:
    g = options.generation
    checks = [
        (g.max_new_tokens >= 1, f"--max-new-tokens must be >= 1 (got {g.max_new_tokens})"),
        (g.temperature >= 0, f"--temperature must be >= 0 (got {g.temperature})"),
        (0 < g.top_p <= 1, f"--top-p must be in (0, 1] (got {g.top_p})"),
        (g.top_k >= 0, f"--top-k must be >= 0 (got {g.top_k})"),
        (options.batch_size >= 1, f"--batch-size must be >= 1 (got {options.batch_size})"),
        (options.tp >= 1, f"--tp must be >= 1 (got {options.tp})"),
        (options.rows_per_file >= 1, f"--rows-per-file must be >= 1 (got {options.rows_per_file})"),
        (options.limit is None or options.limit >= 1, f"--limit must be >= 1 (got {options.limit})"),
        (options.vq_cache_size >= 0, f"--vq-cache-size must be >= 0 (got {options.vq_cache_size})"),
        (options.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda (got {options.device!r})"),
    ]
    for ok, message in checks:
        if not ok:
            raise OptionsError(message)
    if options.dtype != "auto":
        try:
            parse_dtype(options.dtype)
        except ChameleonError:
            raise OptionsError(f"--dtype {options.dtype!r}: use auto, bfloat16, float16 or float32") from None
    if not options.prompt_column and IMAGE_PLACEHOLDER not in options.prompt:
        raise OptionsError(f"--prompt must contain at least one {IMAGE_PLACEHOLDER} placeholder")


def check_model(options: CaptionOptions) -> ChameleonConfig:
    """The model folder is complete: config, weights index, tokenizer, processor settings."""
    model = Path(options.model)
    if not model.is_dir():
        raise OptionsError(f"--model {options.model}: no such directory")
    try:
        config = ChameleonConfig.from_pretrained(model)
        checkpoint_files(model)
        ChameleonProcessor.from_pretrained(model, config)
    except ChameleonError as exc:
        raise OptionsError(f"--model {options.model}: incomplete or invalid checkpoint: {exc}") from None
    context = config.max_position_embeddings
    if options.generation.max_new_tokens >= context:
        raise OptionsError(
            f"--max-new-tokens {options.generation.max_new_tokens}: no room left for a prompt in the "
            f"model's context of {context} positions"
        )
    if config.num_attention_heads % options.tp:
        raise OptionsError(
            f"--tp {options.tp}: the model's {config.num_attention_heads} attention heads are not divisible by it"
        )
    return config


def check_columns(available: list[str], options: CaptionOptions, source: str) -> None:
    wanted = {"--image-column": [options.image_column]}
    if options.prompt_column:
        wanted["--prompt-column"] = [options.prompt_column]
    if options.keep_columns:
        wanted["--keep-columns"] = list(options.keep_columns)
    if options.template_columns:
        wanted["prompt template"] = list(options.template_columns)
    for flag, columns in wanted.items():
        missing = [c for c in columns if c not in available]
        if missing:
            raise OptionsError(
                f"{flag}: column(s) {', '.join(missing)} not found in {source}; available columns: "
                f"{', '.join(available)}"
            )


def check_output_writable(options: CaptionOptions) -> None:
    """Write and delete a probe file under --output; leave nothing behind (not even a new folder)."""
    out = options.output
    fs = options.storage.filesystem(out)
    path = fs_path(out)
    created: list[str] = []  # folders this check made, deepest first
    try:
        if not is_remote(out):
            if os.path.exists(path) and not os.path.isdir(path):
                raise OptionsError(f"--output {out}: exists and is not a directory")
            missing = path
            while not os.path.exists(missing) and os.path.dirname(missing) != missing:
                created.append(missing)
                missing = os.path.dirname(missing)
            if created:
                os.makedirs(path)
        probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex}"
        with fs.open(probe, "wb") as f:
            f.write(b"probe")
        fs.rm(probe)
    except OptionsError:
        raise
    except Exception as exc:  # permission errors, missing buckets, bad endpoints...
        raise OptionsError(f"--output {out}: not writable ({type(exc).__name__}: {exc})") from None
    finally:
        for folder in created:
            try:
                os.rmdir(folder)
            except OSError:
                break


def resolve_device(options: CaptionOptions, cluster_gpus_per_node: list[float],
                   where: str = "the Ray cluster") -> CaptionOptions:
    """Pick the device and dtype; refuse --tp larger than the GPUs of any one node."""
    max_gpus = max(cluster_gpus_per_node, default=0)
    device = options.device
    if device == "auto":
        device = "cuda" if max_gpus >= 1 else "cpu"
    if device == "cuda":
        if max_gpus < 1:
            need = f" (--tp {options.tp} needs {options.tp} GPUs on one node)" if options.tp > 1 else ""
            raise OptionsError(f"--device cuda: {where} has no GPU{need}")
        if options.tp > max_gpus:
            raise OptionsError(
                f"--tp {options.tp} is larger than the GPUs on any node of {where} ({int(max_gpus)}); "
                "a tensor-parallel replica must fit on one node"
            )
    dtype = options.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return replace(options, resolved_device=device, resolved_dtype=str(parse_dtype(dtype)).removeprefix("torch."))


def validate(options: CaptionOptions) -> ChameleonConfig:
    """Cheap checks that need no cluster; see also `resolve_device` and the input schema checks."""
    check_numbers(options)
    config = check_model(options)
    try:
        check_output_writable(options)
    except StorageError as exc:
        raise OptionsError(str(exc)) from None
    return config


def dumps_settings(options: CaptionOptions) -> str:
    return json.dumps(options.job_settings(), sort_keys=True)

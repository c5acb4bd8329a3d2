"""The Ray Data stages: CPU preprocessing, accelerator generation (optionally tensor-parallel).

Both stages are callable classes for `Dataset.map_batches` on pyarrow batches. A row never fails a
batch: anything wrong with it (unreadable image, bad prompt, too long) becomes its `error` value,
and it flows on to the output with the rest.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from chameleon_core.errors import ChameleonError, TensorParallelError
from pipeline.storage import ImageResolver, ImageSourceError, StorageOptions
from pipeline.units import SOURCE

if TYPE_CHECKING:  # torch-free at import: the CPU preprocessing actors load this module too
    from chameleon_core.sampling import SamplingParams

# Columns added by the preprocessing stage and consumed by the generation stage.
PROMPT_IDS, PIXELS, NUM_IMAGES, ERROR = "_prompt_ids", "_pixels", "_num_images", "error"
T_PRE, T_GEN = "_t_preprocess", "_t_generate"
# Content hashes of a row's crops (preprocessing) and, per row, how many of its images the generation
# stage VQ-encoded and how many it took from its cache. Internal: the writer drops them.
IMAGE_KEYS, VQ_ENCODED, VQ_REUSED = "_image_keys", "_vq_encoded", "_vq_reused"
OUTPUT_COLUMNS = ("caption", "error", "finish_reason", "num_prompt_tokens", "num_generated_tokens")


def error_type(message: str) -> str:
    """The exception type named by a `format_error` message (the whole message if it has no colon)."""
    return message.split(":", 1)[0]


def format_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def image_key(crop: np.ndarray) -> bytes:
    """Content hash of a preprocessed crop: equal pixels give equal VQ codes, whatever file they came from."""
    return hashlib.blake2b(np.ascontiguousarray(crop).data, digest_size=16).digest()


@dataclass(frozen=True)
class PreprocessConfig:
    model: str
    id_column: str
    image_column: str
    prompt: str
    prompt_column: str | None
    template_columns: tuple[str, ...]
    text_completion: bool
    max_new_tokens: int
    storage: StorageOptions
    allow_local_paths: bool
    max_image_pixels: int
    max_image_bytes: int


class PreprocessStage:
    """Decode images, convert/resize/crop them to uint8, and tokenize the prompt (CPU actor)."""

    def __init__(self, config: PreprocessConfig):
        from chameleon_core import ChameleonConfig
        from chameleon_core.processor import ChameleonProcessor

        self.config = config
        model_config = ChameleonConfig.from_pretrained(config.model)
        self.max_positions = model_config.max_position_embeddings
        self.processor = ChameleonProcessor.from_pretrained(
            config.model, model_config, max_pixels=config.max_image_pixels, max_bytes=config.max_image_bytes
        )
        self.resolver = ImageResolver(config.storage, config.allow_local_paths, config.max_image_bytes)

    def prompt_text(self, row: dict[str, Any]) -> str:
        cfg = self.config
        if cfg.prompt_column:
            value = row.get(cfg.prompt_column)
            if value is None:
                raise ValueError(f"prompt column {cfg.prompt_column!r} is null")
            return str(value)
        text = cfg.prompt
        for name in cfg.template_columns:
            text = text.replace("{" + name + "}", "" if row.get(name) is None else str(row[name]))
        return text

    def process_row(self, row: dict[str, Any]) -> tuple[list[int], bytes, list[bytes]]:
        cfg = self.config
        images = self.resolver.images(row.get(cfg.image_column), row.get(SOURCE) or "")
        ids = self.processor.prompt_ids(self.prompt_text(row), len(images), cfg.text_completion, name="prompt")
        if len(ids) + cfg.max_new_tokens > self.max_positions:
            raise ValueError(
                f"prompt has {len(ids)} tokens; with max_new_tokens={cfg.max_new_tokens} it exceeds the "
                f"model's context of {self.max_positions}"
            )
        crops = [self.processor.image_preprocessor.crop(data, name=f"image {j}") for j, data in enumerate(images)]
        pixels = b"".join(c.tobytes() for c in crops)
        # Hashed here, on the CPU pool, so the accelerator actor only looks keys up.
        return ids, pixels, [image_key(c) for c in crops]

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        rows = batch.to_pylist()
        prompt_ids, pixels, keys, counts, errors = [], [], [], [], []
        for row in rows:
            try:
                ids, data, row_keys = self.process_row(row)
                prompt_ids.append(ids)
                pixels.append(data)
                keys.append(row_keys)
                counts.append(len(row_keys))
                errors.append(None)
            except (ChameleonError, ImageSourceError, ValueError, OSError) as exc:
                prompt_ids.append(None)
                pixels.append(None)
                keys.append(None)
                counts.append(0)
                errors.append(format_error(exc))
        out = batch.drop_columns([self.config.image_column])
        elapsed = (time.perf_counter() - start) / max(1, len(rows))
        for name, values, typ in (
            (PROMPT_IDS, prompt_ids, pa.list_(pa.int32())),
            (PIXELS, pixels, pa.large_binary()),
            (IMAGE_KEYS, keys, pa.list_(pa.binary())),
            (NUM_IMAGES, counts, pa.int32()),
            (ERROR, errors, pa.string()),
            (T_PRE, [elapsed] * len(rows), pa.float64()),
        ):
            out = out.append_column(name, pa.array(values, typ))
        return out


@dataclass(frozen=True)
class GenerateConfig:
    model: str
    id_column: str
    device: str
    dtype: str
    tp: int
    batch_size: int
    sampling: SamplingParams
    save_token_ids: bool
    torch_threads: int | None
    compile: bool
    rank_resources: dict[str, float]
    vq_cache_size: int = 4096  # images whose VQ tokens a replica keeps (LRU); 0 keeps none between calls


class ImageTokenCache:
    """LRU map from an image's content hash to its VQ tokens (a CPU tensor of image_seq_length ids).

    VQA sets ask many questions about one image; each image is then VQ-encoded once per replica, not
    once per question. An entry is image_seq_length int64 ids (8 KiB for Chameleon's 1024).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[bytes, Any] = OrderedDict()

    def get(self, key: bytes):
        tokens = self.entries.get(key)
        if tokens is not None:
            self.entries.move_to_end(key)
        return tokens

    def put(self, key: bytes, tokens) -> None:
        if self.capacity <= 0:
            return
        self.entries[key] = tokens
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


def restore_default_priority() -> None:
    """Run this thread, and the threads it starts later, at the default priority.

    Ray starts workers at niceness 15. The CPU decode's thread team waits at a barrier after every
    op, so whenever any of Ray's own threads wakes and preempts one member, the whole team stalls:
    the generate stage ran ~1.3x slower than the same code in a plain process on a 2-core machine.
    On Linux this applies to the calling thread; Ray Data's UDF thread and the torch thread team are
    started after this, from this thread, and inherit it. Not permitted without CAP_SYS_NICE (then
    the job runs as before).
    """
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (OSError, AttributeError):
        pass


class EngineRunner:
    """One rank's engine. Rank 0 fills image tokens (through its cache) and returns results; other
    ranks get the filled prompts and only take part in the collectives of generation."""

    def __init__(self, config: GenerateConfig, rank: int = 0, address: str | None = None):
        import torch

        from chameleon_core import ChameleonEngine
        from chameleon_core.distributed import init_tp_group

        threads = config.torch_threads or max(1, (os.cpu_count() or 1) // config.tp)
        if config.device == "cpu":
            torch.set_num_threads(threads)
            restore_default_priority()
        device = "cuda:0" if config.device == "cuda" else "cpu"  # Ray exposes exactly one GPU per rank
        self.tp = init_tp_group(rank, config.tp, address, device=device) if config.tp > 1 else None
        self.engine = ChameleonEngine.from_pretrained(config.model, device=device, dtype=config.dtype, tp=self.tp)
        if config.compile:
            self.engine.compile(vq_batch=config.batch_size)
        self.config = config
        self.crop_shape = (3, *self.engine.processor.image_preprocessor.output_size)
        self.cache = ImageTokenCache(config.vq_cache_size)

    def ready(self) -> bool:
        return True

    def fill(self, prompts: list[list[int]], pixels: list[bytes | None],
             keys: list[list[bytes] | None]) -> tuple[list[list[int]], list[tuple[int, int]]]:
        """Prompts with their `<image>` placeholders replaced by VQ tokens, and per row (encoded, reused).

        Runs on rank 0 only: the VQ-VAE is replicated and needs no collective, and sending the filled
        prompts to the other ranks keeps every rank's input identical, whatever a cache would hold.
        """
        import torch

        crops, crop_keys, owners = self._unpack(pixels, keys)
        if not crops:
            return [list(p) for p in prompts], [(0, 0)] * len(prompts)
        tokens, encoded = self._image_tokens(crops, crop_keys)
        counts = [[0, 0] for _ in prompts]
        for i, row in enumerate(owners):
            counts[row][0 if i in encoded else 1] += 1
        flat = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
        filled = self.engine.processor.fill_image_tokens(flat, torch.stack([tokens[k] for k in crop_keys]))
        filled = filled.tolist()
        out, start = [], 0
        for p in prompts:
            out.append(filled[start : start + len(p)])
            start += len(p)
        return out, [(e, r) for e, r in counts]

    def _unpack(self, pixels: list[bytes | None], keys: list[list[bytes] | None]):
        """Every crop of the call in placeholder order, its content key, and the row it belongs to."""
        crops: list[np.ndarray] = []
        crop_keys: list[bytes] = []
        owners: list[int] = []
        for row, (data, row_keys) in enumerate(zip(pixels, keys)):
            if not data:
                continue
            row_crops = list(np.frombuffer(data, dtype=np.uint8).reshape(-1, *self.crop_shape))
            crops.extend(row_crops)
            # Keys come from the preprocessing stage; a caller that skipped it gets them computed here.
            crop_keys.extend(row_keys if row_keys is not None else [image_key(c) for c in row_crops])
            owners.extend([row] * len(row_crops))
        return crops, crop_keys, owners

    def _image_tokens(self, crops: list[np.ndarray], crop_keys: list[bytes]):
        """Tokens per key; only images neither cached nor repeated earlier in this call are encoded,
        together in one VQ batch. Returns the tokens and the positions of the crops that were encoded."""
        tokens = {}
        to_encode: list[int] = []
        for i, key in enumerate(crop_keys):
            if key in tokens:
                continue
            tokens[key] = self.cache.get(key)
            if tokens[key] is None:
                to_encode.append(i)
        if to_encode:
            encoded = self.engine.image_tokens(np.stack([crops[i] for i in to_encode])).cpu()
            for i, row_tokens in zip(to_encode, encoded):
                tokens[crop_keys[i]] = row_tokens
                self.cache.put(crop_keys[i], row_tokens)
        return tokens, set(to_encode)

    def generate(self, prompts: list[list[int]], seeds: list[int] | None):
        result = self.engine.generate_ids(prompts, self.config.sampling, seeds)
        return result if self.tp is None or self.tp.rank == 0 else None


def _rank_worker_class():
    import ray

    @ray.remote
    class RankWorker:
        def __init__(self, config: GenerateConfig, rank: int, address: str):
            self.runner = EngineRunner(config, rank, address)

        def ready(self) -> bool:
            return True

        def generate(self, prompts, seeds):
            return self.runner.generate(prompts, seeds)

    return RankWorker


class GenerateStage:
    """VQ-encode images, generate on length-sorted micro-batches, detokenize (one actor per replica).

    Images are VQ-encoded once per replica: their tokens are cached by content hash (LRU of
    `vq_cache_size` images), and each row reports how many of its images were encoded or reused.
    With tp > 1 this actor is rank 0 and starts ranks 1..tp-1 as child actors; the placement group it
    was scheduled into (STRICT_PACK, one bundle per rank) captures them on the same node. Rank 0 does
    the VQ encoding and sends the filled prompts to the other ranks.
    """

    def __init__(self, config: GenerateConfig):
        self.config = config
        self.helpers: list[Any] = []
        address = None
        if config.tp > 1:
            import ray

            from chameleon_core.distributed import free_port

            host = ray.util.get_node_ip_address()
            address = f"{host}:{free_port(host)}"
            worker = _rank_worker_class()
            self.helpers = [
                worker.options(**config.rank_resources).remote(config, rank, address)
                for rank in range(1, config.tp)
            ]
        self.runner = EngineRunner(config, 0, address)
        if self.helpers:
            import ray

            ray.get([h.ready.remote() for h in self.helpers])
        self.tokenizer = self.runner.engine.tokenizer

    def _generate(self, prompts: list[list[int]], seeds: list[int] | None):
        if not self.helpers:
            return self.runner.generate(prompts, seeds)
        import ray

        refs = [h.generate.remote(prompts, seeds) for h in self.helpers]
        result = self.runner.generate(prompts, seeds)
        ray.get(refs)
        return result

    def _seeds(self, ids: list[Any]) -> list[int] | None:
        from chameleon_core.sampling import row_seed

        if self.config.sampling.greedy:
            return None
        return [row_seed(self.config.sampling.seed, str(i)) for i in ids]

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch.column(ERROR).to_pylist()
        prompts = batch.column(PROMPT_IDS).to_pylist()
        pixels = batch.column(PIXELS).to_pylist()
        keys = batch.column(IMAGE_KEYS).to_pylist() if IMAGE_KEYS in batch.column_names else [None] * n
        ids = batch.column(self.config.id_column).to_pylist()
        # Per row, images VQ-encoded / taken from the cache, summed over attempts (a retried row that
        # hits the cache is a real saving), so the job totals equal the encoder's actual work.
        vq = [[0, 0] for _ in range(n)]
        captions: list[str | None] = [None] * n
        reasons = ["error"] * n
        generated: list[list[int] | None] = [None] * n
        prompt_lens = [len(p) if p is not None else None for p in prompts]
        t_gen = [0.0] * n
        # Length-sorted micro-batches keep padding small when prompts differ in length.
        todo = sorted((i for i in range(n) if errors[i] is None), key=lambda i: prompt_lens[i])
        size = self.config.batch_size
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            t0 = time.perf_counter()
            for i, outcome in zip(chunk, self._run_chunk(chunk, (prompts, pixels, keys, ids), vq)):
                if isinstance(outcome, str):
                    errors[i] = outcome
                else:
                    generated[i], reasons[i] = outcome
            per_row = (time.perf_counter() - t0) / len(chunk)
            for i in chunk:
                t_gen[i] = per_row
        done = [i for i in range(n) if generated[i] is not None]
        for i, text in zip(done, self.tokenizer.decode_batch([generated[i] for i in done])):
            captions[i] = text
        out = batch.drop_columns([c for c in (PROMPT_IDS, PIXELS, IMAGE_KEYS, ERROR) if c in batch.column_names])
        columns = {
            "caption": pa.array(captions, pa.string()),
            ERROR: pa.array(errors, pa.string()),
            "finish_reason": pa.array(reasons, pa.string()),
            "num_prompt_tokens": pa.array(prompt_lens, pa.int32()),
            "num_generated_tokens": pa.array([len(g) if g is not None else None for g in generated], pa.int32()),
            T_GEN: pa.array(t_gen, pa.float64()),
            VQ_ENCODED: pa.array([v[0] for v in vq], pa.int32()),
            VQ_REUSED: pa.array([v[1] for v in vq], pa.int32()),
        }
        if self.config.save_token_ids:
            columns["output_token_ids"] = pa.array(generated, pa.list_(pa.int32()))
        for name, values in columns.items():
            out = out.append_column(name, values)
        return out

    def _run_chunk(self, chunk: list[int], inputs: tuple[list, list, list, list], vq: list[list[int]]):
        """(tokens, finish_reason) per row, or an error string; a failing batch is retried row by row.

        `inputs` is (prompt ids, pixels, image keys, row ids) of the whole batch; `vq` collects, per
        row, the images encoded and reused by every attempt.
        """
        prompts, pixels, keys, ids = inputs
        try:
            filled, counts = self.runner.fill([prompts[i] for i in chunk], [pixels[i] for i in chunk],
                                              [keys[i] for i in chunk])
            for i, (encoded, reused) in zip(chunk, counts):
                vq[i][0] += encoded
                vq[i][1] += reused
            result = self._generate(filled, self._seeds([ids[i] for i in chunk]))
            return list(zip(result.token_ids, result.finish_reasons))
        except TensorParallelError:
            raise  # the replica itself is broken: let Ray restart the actor and retry the batch
        except (ChameleonError, ValueError, RuntimeError) as exc:
            if len(chunk) == 1:
                return [format_error(exc)]
            return [self._run_chunk([i], inputs, vq)[0] for i in chunk]

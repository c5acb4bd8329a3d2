"""Code run inside spawned tensor-parallel rank processes (must be importable by the children)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def multimodal_batch(engine, image_paths: list[str]) -> tuple[list[list[int]], list[str]]:
    """Three left-padded prompts of different lengths: two images, one image, text only."""
    from PIL import Image

    imgs = [Image.open(p) for p in image_paths]
    texts = ["Compare <image> with <image>, please.", "<image> What is shown here?", "Just text, no image at all."]
    images = [[imgs[0], imgs[1]], [imgs[2]], []]
    prompts = [engine.prompt_ids(t, len(i)) for t, i in zip(texts, images)]
    crops = [engine.processor.image_preprocessor.crop(img) for row in images for img in row]
    return engine.fill_images(prompts, crops), texts


def run_rank(rank: int, world: int, address: str, checkpoint: str, image_paths: list[str], out_dir: str,
             max_new_tokens: int = 16) -> None:
    from chameleon_core import ChameleonEngine, SamplingParams
    from chameleon_core.distributed import init_tp_group

    torch.set_num_threads(1)
    tp = init_tp_group(rank, world, address, timeout_s=60)
    try:
        engine = ChameleonEngine.from_pretrained(checkpoint, tp=tp)
        prompts, _ = multimodal_batch(engine, image_paths)
        logits = engine.prompt_logits(prompts)
        greedy = engine.generate_ids(prompts, SamplingParams(max_new_tokens=max_new_tokens))
        sampled = engine.generate_ids(
            prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, top_p=0.95, seed=11)
        )
        torch.save(
            {"logits": logits, "greedy": greedy.token_ids, "sampled": sampled.token_ids,
             "q_proj_rows": engine.model.model.layers[0].self_attn.q_proj.weight.shape[0]},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        tp.close()
    exit_without_teardown()


def exit_without_teardown() -> None:
    """End a rank process once its results are on disk.

    Even after destroy_process_group, gloo's worker threads occasionally meet interpreter shutdown and
    abort the process ("terminate called without an active exception", about 1 run in 15 here, also
    in CI). The results are written and closed by then, so skip the interpreter's teardown.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def join_group(rank: int, world: int, address: str, timeout_s: float, out_dir: str) -> None:
    """Try to form a group and record the error message (or 'ok')."""
    from chameleon_core.distributed import init_tp_group

    try:
        tp = init_tp_group(rank, world, address, timeout_s=timeout_s)
        tp.close()
        message = "ok"
    except Exception as exc:  # recorded for the parent test to assert on
        message = f"{type(exc).__name__}: {exc}"
    Path(out_dir, f"join{rank}.txt").write_text(message)
    exit_without_teardown()


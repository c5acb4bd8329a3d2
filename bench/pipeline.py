"""Pipeline efficiency: the caption job's images/s against a plain loop over chameleon_core's generate.

Same rows, same prompt, same batch size, dtype and greedy settings on both sides. The loop is the
ceiling (one process, model already loaded, images decoded inline); the pipeline pays for Ray, actor
start-up and model loading inside its actor, Parquet in and out, and the hand-off between stages. Runs
alternate (loop, pipeline, loop, ...) and the ratio of medians is reported with each stage's time.

    python bench/pipeline.py --rows 96 --repeats 2
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import common
import pyarrow as pa
import pyarrow.parquet as pq


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2, help="alternating loop/pipeline pairs")
    p.add_argument("--no-record", action="store_true")
    return p.parse_args()


def distinct_png(path: Path, i: int) -> bytes:
    """The sample image with a small block at its center colored from the row index: every row has
    its own preprocessed pixels, so the pipeline's VQ cache (keyed by the center crop's content)
    saves nothing and both sides do the same work."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    cx, cy = image.width // 2, image.height // 2
    image.paste((i % 256, (i // 256) % 256, 0), (cx - 8, cy - 8, cx + 8, cy + 8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_rows(folder: Path, n: int) -> Path:
    images = [distinct_png(p, i) for i, p in enumerate(common.sample_images(n))]
    table = pa.table({"id": [f"row{i:05d}" for i in range(n)], "image": pa.array(images, pa.binary())})
    path = folder / "images.parquet"
    pq.write_table(table, path)
    return path


def plain_loop(engine, data: Path, batch_size: int, new_tokens: int, prompt: str) -> float:
    from chameleon_core import SamplingParams

    rows = pq.read_table(data).to_pylist()
    start = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        engine.generate([prompt] * len(batch), [[r["image"]] for r in batch], SamplingParams(max_new_tokens=new_tokens))
    return time.perf_counter() - start


def pipeline_run(ckpt: Path, data: Path, out: Path, args) -> dict:
    from pipeline import CaptionOptions, GenerationSettings, run_caption_job

    options = CaptionOptions(
        inputs=(str(data),), output=str(out), model=str(ckpt), batch_size=args.batch_size, device="cpu",
        dtype=args.dtype, generation=GenerationSettings(max_new_tokens=args.new_tokens), force=True,
        rows_per_file=max(args.batch_size, args.rows // 4),
    )
    start = time.perf_counter()
    summary = run_caption_job(options, log=lambda m: None)
    summary["bench_wall_s"] = time.perf_counter() - start
    return summary


def main() -> None:
    args = parse_args()
    from chameleon_core import ChameleonEngine
    from pipeline.caption import ensure_ray
    from pipeline.options import DEFAULT_PROMPT

    ckpt = common.checkpoint(args.preset)
    folder = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    data = write_rows(folder, args.rows)
    engine = ChameleonEngine.from_pretrained(ckpt, dtype=args.dtype)
    plain_loop(engine, data, args.batch_size, 2, DEFAULT_PROMPT)  # warm-up
    ensure_ray()

    loops, pipes, summaries = [], [], []
    for r in range(args.repeats):
        loops.append(plain_loop(engine, data, args.batch_size, args.new_tokens, DEFAULT_PROMPT))
        summary = pipeline_run(ckpt, data, folder / f"out{r}", args)
        summaries.append(summary)
        pipes.append(summary["bench_wall_s"])
        print(f"pair {r}: loop {loops[-1]:.2f}s, pipeline {pipes[-1]:.2f}s (its own clock "
              f"{summary['pipeline_time_s']:.2f}s)", flush=True)

    loop_ips = [args.rows / t for t in loops]
    pipe_ips = [args.rows / t for t in pipes]
    stages = summaries[-1]["stages"]
    lines = [
        "| side | images/s (median) | wall s per run |",
        "|---|---|---|",
        f"| plain loop over ChameleonEngine.generate | {statistics.median(loop_ips):.2f} | "
        f"{', '.join(f'{t:.2f}' for t in loops)} |",
        f"| caption pipeline (Ray Data, end to end incl. start-up) | {statistics.median(pipe_ips):.2f} | "
        f"{', '.join(f'{t:.2f}' for t in pipes)} |",
        "",
        f"pipeline efficiency (pipeline images/s / loop images/s, medians): "
        f"{statistics.median(pipe_ips) / statistics.median(loop_ips):.3f}",
        f"rows {args.rows}, batch {args.batch_size}, new tokens {args.new_tokens}, dtype {args.dtype}, "
        f"preset {args.preset}",
        f"stage busy time in the last pipeline run: {json.dumps(stages)}; VQ encodings "
        f"{summaries[-1]['vq_encodings']}, saved by the image cache {summaries[-1]['vq_encodings_saved']}",
    ]
    print("\n".join(lines))
    if not args.no_record:
        common.append_result("bench/pipeline.py", lines)


if __name__ == "__main__":
    main()

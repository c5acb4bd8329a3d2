"""Memory per rank with tensor parallelism: tp=2 against tp=1 on CPU (gloo, loopback).

Each rank is its own process. It records its resident memory after importing torch (the baseline),
after loading the model (every weight read once), and its peak (VmHWM) after a short batched generation; the table gives the
model's share (loaded - baseline) and the peak above the baseline, per rank, and their ratio to tp=1.

    python bench/tp_memory.py --preset small
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
from pathlib import Path

import common


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_rank(rank: int, world: int, address: str, ckpt: str, out: str, dtype: str) -> None:
    import torch

    from chameleon_core import ChameleonEngine, SamplingParams
    from chameleon_core.distributed import init_tp_group

    torch.set_num_threads(1)
    baseline = _status_mib("VmRSS")
    tp = init_tp_group(rank, world, address, timeout_s=120) if world > 1 else None
    try:
        engine = ChameleonEngine.from_pretrained(ckpt, dtype=dtype, tp=tp)
        with torch.inference_mode():  # weights may be file-backed pages until first read: read them all
            for param in engine.model.parameters():
                param.sum()
        loaded = _status_mib("VmRSS")
        decoder_bytes = sum(p.numel() * p.element_size() for n, p in engine.model.named_parameters()
                            if not n.startswith("model.vqmodel"))
        images = [p.read_bytes() for p in common.sample_images(4)]
        engine.generate(["Describe this image.<image>"] * 4, [[im] for im in images], SamplingParams(max_new_tokens=8))
        peak = _status_mib("VmHWM")
    finally:
        if tp is not None:
            tp.close()
    Path(out, f"rank{world}-{rank}.json").write_text(json.dumps(
        {"baseline": baseline, "loaded": loaded, "peak": peak, "decoder_mib": decoder_bytes / 2**20}))
    os._exit(0)  # skip interpreter teardown, where gloo's threads sometimes abort the process


def measure(world: int, ckpt: Path, out: str, dtype: str) -> list[dict]:
    from chameleon_core.distributed import free_port

    ctx = mp.get_context("spawn")
    address = f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=run_rank, args=(r, world, address, str(ckpt), out, dtype)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
        if p.exitcode != 0:
            raise SystemExit(f"rank process exited with {p.exitcode}")
    return [json.loads(Path(out, f"rank{world}-{r}.json").read_text()) for r in range(world)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    ckpt = common.checkpoint(args.preset)
    out = tempfile.mkdtemp(prefix="bench-tp-")
    one = measure(1, ckpt, out, args.dtype)[0]
    two = measure(2, ckpt, out, args.dtype)

    def row(name: str, r: dict) -> str:
        return (f"| {name} | {r['decoder_mib']:.0f} | {r['loaded'] - r['baseline']:.0f} | "
                f"{r['peak'] - r['baseline']:.0f} | {r['peak']:.0f} | "
                f"{(r['loaded'] - r['baseline']) / (one['loaded'] - one['baseline']):.2f} |")

    lines = ["| rank | decoder weights MiB | RSS after load - baseline MiB | peak - baseline MiB | peak RSS MiB "
             "| loaded share vs tp=1 |", "|---|---|---|---|---|---|", row("tp=1 rank 0", one)]
    lines += [row(f"tp=2 rank {i}", r) for i, r in enumerate(two)]
    lines.append("")
    lines.append(f"preset {args.preset}, dtype {args.dtype}; baseline = RSS after importing torch "
                 f"({one['baseline']:.0f} MiB), the same in every process; the VQ-VAE is replicated on each rank.")
    print("\n".join(lines))
    if not args.no_record:
        common.append_result(f"bench/tp_memory.py preset={args.preset}", lines)


if __name__ == "__main__":
    main()

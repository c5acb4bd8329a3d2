"""Batched greedy captioning: chameleon_core against transformers' generate, side by side.

Both sides start from the same PIL images and prompts (image preprocessing, VQ encoding, prefill and
decode all counted), in the same dtype on the same device, alternating A/B so that drift in the
machine's speed hits both. Each side runs in a process of its own, as a user would run it: process-wide
state that one side sets (chameleon_core's allocator policy, compiled graphs, thread pools) never
reaches the other's timings, and peak memory is each side's own. Prints a table and the ratio of
images/s with its spread, and appends them to bench/RESULTS.md.

    python bench/generate.py --preset small --runs 5                 # CPU, here
    python bench/generate.py --preset 7b-shape --device cuda --dtype bfloat16 --batch 16
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import common
import torch
from PIL import Image


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="random checkpoint preset (tiny, small, 7b-shape)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", help="model dtype for both sides (auto: bfloat16 when fast)")
    p.add_argument("--batch", type=int, default=8, help="images per batch (one image per prompt)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=5, help="timed A/B pairs after one warm-up pair")
    p.add_argument("--no-compile", action="store_true", help="run ours eagerly (no torch.compile)")
    p.add_argument("--no-hf", action="store_true", help="only time chameleon_core")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one run of ours")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    return p.parse_args()


PROMPT = "Describe this image in one sentence.<image>"


class Ours:
    name = "chameleon_core"

    def __init__(self, ckpt, device, dtype, compile_model: bool):
        from chameleon_core import ChameleonEngine

        self.device = device
        # The VQ runs in the model dtype too, as transformers runs it: the same dtype on both sides.
        self.engine = ChameleonEngine.from_pretrained(ckpt, device=device, dtype=dtype, vq_dtype=dtype)
        if compile_model:
            self.engine.compile(layers=True)

    def run(self, images, new_tokens: int) -> dict:
        from chameleon_core import SamplingParams

        out = self.engine.generate([PROMPT] * len(images), [[im] for im in images],
                                   SamplingParams(max_new_tokens=new_tokens))
        r = out.result
        return {"tokens": r.token_ids, "prompt_tokens": sum(r.num_prompt_tokens),
                "ttft_s": out.timings["preprocess_s"] + out.timings["vq_s"] + r.prefill_s, "decode_s": r.decode_s}


class _Stamps:
    """A generate() streamer that only notes when the prompt went in and when each new token came out."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.times.append(time.perf_counter())


class Transformers:
    name = "transformers"

    def __init__(self, ckpt, device, dtype):
        from transformers import ChameleonForConditionalGeneration, ChameleonProcessor

        self.model = ChameleonForConditionalGeneration.from_pretrained(ckpt, dtype=dtype).to(device).eval()
        self.processor = ChameleonProcessor.from_pretrained(ckpt)
        self.processor.tokenizer.padding_side = "left"
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def run(self, images, new_tokens: int) -> dict:
        start = time.perf_counter()
        inputs = self.processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)  # its VQ runs in the model dtype
        stamps = _Stamps()
        out = self.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, streamer=stamps)
        _sync(self.device)
        end = time.perf_counter()
        width = inputs["input_ids"].shape[1]
        eos = self.model.generation_config.eos_token_id
        tokens = []
        for row in out[:, width:].tolist():
            if eos in row:
                row = row[: row.index(eos) + 1]
            tokens.append(row)
        first_token = stamps.times[1] if len(stamps.times) > 2 else end
        return {"tokens": tokens, "prompt_tokens": int(inputs["attention_mask"].sum()),
                "ttft_s": first_token - start, "decode_s": end - first_token}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(side, images, new_tokens: int) -> dict:
    _sync(side.device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with common.PeakRSS() as rss:
        start = time.perf_counter()
        result = side.run(images, new_tokens)
        result["wall_s"] = time.perf_counter() - start
    result["peak_mib"] = common.gpu_peak_mib() if torch.cuda.is_available() else rss.peak_mib
    return result


def _serve(conn, kind: str, args: argparse.Namespace) -> None:
    """A side's process: build it, warm it up, then answer "run"/"profile" requests until "stop"."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from chameleon_core.engine import resolve_device

    device = resolve_device(args.device)
    ckpt = common.checkpoint(args.preset)
    images = [Image.open(p).convert("RGB") for p in common.sample_images(args.batch)]
    side = Ours(ckpt, device, args.torch_dtype, not args.no_compile) if kind == "ours" else Transformers(
        ckpt, device, args.torch_dtype)
    start = time.perf_counter()
    side.run(images, args.new_tokens)  # warm-up (and compilation) outside the timed runs
    print(f"warm-up {side.name}: {time.perf_counter() - start:.1f}s", flush=True)
    conn.send(side.name)
    while (request := conn.recv()) != "stop":
        if request == "run":
            conn.send(timed(side, images, args.new_tokens))
        else:
            profile(side, images, args.new_tokens)
            conn.send(None)


class SideProcess:
    """One side of the comparison in its own spawned process, driven over a pipe."""

    def __init__(self, kind: str, args: argparse.Namespace):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, kind, args), daemon=True)
        self.process.start()
        self.name = self._receive()

    def _receive(self):
        if not self.conn.poll(3600):
            raise TimeoutError("benchmark side did not answer within an hour")
        try:
            return self.conn.recv()
        except EOFError:
            raise RuntimeError(f"benchmark side process exited with code {self.process.exitcode}") from None

    def request(self, what: str):
        self.conn.send(what)
        return self._receive()

    def stop(self) -> None:
        self.conn.send("stop")
        self.process.join()


def main() -> None:
    args = parse_args()
    from chameleon_core.config import ChameleonConfig
    from chameleon_core.cost_model import CostModel, device_peaks
    from chameleon_core.engine import resolve_device

    device = resolve_device(args.device)
    args.torch_dtype = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16,
                        "float32": torch.float32}[args.dtype]
    ckpt = common.checkpoint(args.preset)  # written once, here, before the sides start
    # One at a time, so the second side's loading does not slow the first one's warm-up.
    sides = [SideProcess("ours", args)] + ([] if args.no_hf else [SideProcess("transformers", args)])
    if args.profile:
        sides[0].request("profile")

    runs: dict[str, list[dict]] = {s.name: [] for s in sides}
    for i in range(args.runs):
        for side in sides if i % 2 == 0 else sides[::-1]:
            runs[side.name].append(side.request("run"))
    for side in sides:
        side.stop()

    config = ChameleonConfig.from_pretrained(ckpt)
    cost = CostModel(config)
    peaks = device_peaks(torch.cuda.get_device_name()) if device.type == "cuda" else None
    lines = table(runs, args, cost, peaks, args.torch_dtype)
    if len(sides) == 2:
        ours, hf = (runs[s.name] for s in sides)
        ratios = [b["wall_s"] / a["wall_s"] for a, b in zip(ours, hf)]
        same = sum(a == b for a, b in zip(ours[-1]["tokens"], hf[-1]["tokens"]))
        lines += ["", f"images/s ratio chameleon_core / transformers, per A/B pair: {common.median_spread(ratios)}",
                  f"greedy outputs identical for {same}/{args.batch} rows"]
    print("\n".join(lines))
    if not args.no_record:
        common.append_result(f"bench/generate.py preset={args.preset} device={device.type} "
                             f"dtype={str(args.torch_dtype)[6:]} batch={args.batch} new_tokens={args.new_tokens} "
                             f"compile={not args.no_compile} (one process per side)", lines)


def table(runs, args, cost, peaks, dtype) -> list[str]:
    dtype_bytes = torch.finfo(dtype).bits // 8
    head = ("| side | images/s (median) | wall s (median, min-max) | TTFT s | prefill tok/s | decode tok/s "
            "| peak MiB | achieved |")
    lines = [head, "|" + "---|" * 8]
    for name, rs in runs.items():
        wall = [r["wall_s"] for r in rs]
        med = statistics.median(wall)
        ttft = statistics.median(r["ttft_s"] for r in rs)
        decode = statistics.median(r["decode_s"] for r in rs)
        new = sum(len(t) for t in rs[-1]["tokens"])
        prompt_tokens = rs[-1]["prompt_tokens"]
        lengths = [prompt_tokens // args.batch] * args.batch
        steps = max(len(t) for t in rs[-1]["tokens"]) - 1
        context = lengths[0] + args.new_tokens // 2
        flops = cost.prefill_flops(lengths) / ttft
        bytes_s = cost.decode_bytes_per_step(args.batch, context, dtype_bytes) * steps / max(decode, 1e-9)
        achieved = f"prefill {flops / 1e12:.2f} TFLOP/s, decode {bytes_s / 1e9:.0f} GB/s"
        if peaks:
            achieved += f" (MFU {flops / peaks[0]:.1%}, MBU {bytes_s / peaks[1]:.1%})"
        lines.append(f"| {name} | {args.batch / med:.2f} | {med:.3f} ({min(wall):.3f}-{max(wall):.3f}) | {ttft:.3f} "
                     f"| {prompt_tokens / ttft:.0f} | {new / max(decode, 1e-9):.0f} "
                     f"| {max(r['peak_mib'] for r in rs):.0f} | {achieved} |")
    lines.append("")
    lines.append("TTFT includes preprocessing and VQ encoding; prefill tok/s is prompt tokens over TTFT; "
                 "peak MiB is the side's process RSS (CPU) or CUDA memory allocated (GPU), "
                 "weights included; 'achieved' uses chameleon_core/cost_model.py.")
    return lines


def profile(side, images, new_tokens: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        side.run(images, new_tokens)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20))


if __name__ == "__main__":
    main()

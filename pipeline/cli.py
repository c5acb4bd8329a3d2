"""Command-line flags shared by the jobs, and the exit-code convention (2 = bad flags or input)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from pipeline.options import DEFAULT_PROMPT, CaptionOptions, GenerationSettings, OptionsError, parse_range
from pipeline.storage import StorageOptions

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def add_model_and_data_flags(parser: argparse.ArgumentParser, prompt_help: str, default_prompt: str,
                             prompt_flags: tuple[str, ...] = ("--prompt",), default_max_new_tokens: int = 32) -> None:
    """The flags every job shares. `prompt_flags` names the prompt flag (the VQA job calls it
    --prompt-template, with --prompt as an alias); its value is always `args.prompt`."""
    data = parser.add_argument_group("data")
    data.add_argument("--input", nargs="+", metavar="URI",
                      help="Parquet files, directories or globs; local paths or s3:// URIs")
    data.add_argument("--output", metavar="URI", help="output folder (local or s3://); one part file per unit")
    data.add_argument("--id-column", default="id",
                      help="row id column (default: id); if absent, ids are '<file name>:<row index>'")
    data.add_argument("--image-column", default="image",
                      help="encoded image bytes, a path/URI (relative to the Parquet file), a {bytes, path} "
                           "struct, or a list of these for multi-image rows (default: image)")
    data.add_argument(*prompt_flags, dest="prompt", default=default_prompt, help=prompt_help)
    data.add_argument("--keep-columns", nargs="*", default=[], metavar="COL",
                      help="input columns copied to the output unchanged")
    data.add_argument("--limit", type=int, default=None, help="process only the first N rows of the input")
    data.add_argument("--rows-per-file", type=int, default=1000,
                      help="rows per output file; each file is also a unit of commit and resume (default: 1000)")
    data.add_argument("--force", action="store_true",
                      help="delete an existing output made with other settings and start again")
    data.add_argument("--allow-local-paths", action="store_true",
                      help="let a remote input refer to local image files (refused by default)")

    s3 = parser.add_argument_group("object storage (defaults: the standard AWS_* variables)")
    s3.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (e.g. a MinIO or moto server)")
    s3.add_argument("--s3-key", default=None, help="access key id")
    s3.add_argument("--s3-secret", default=None, help="secret access key")
    s3.add_argument("--s3-region", default=None, help="region name")

    model = parser.add_argument_group("model and generation")
    model.add_argument("--model", metavar="DIR", help="Chameleon checkpoint folder in the Hugging Face layout")
    model.add_argument("--max-new-tokens", type=int, default=default_max_new_tokens,
                       help=f"tokens to generate per row (default: {default_max_new_tokens})")
    model.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    model.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1, off)")
    model.add_argument("--top-k", type=int, default=0, help="sample among the k best tokens (default: 0, off)")
    model.add_argument("--seed", type=int, default=0,
                       help="sampling seed; each row's randomness depends only on this and its id")
    model.add_argument("--text-completion", action="store_true",
                       help="do not append the separator token (Chameleon's chat mode) to prompts")

    compute = parser.add_argument_group("compute")
    compute.add_argument("--batch-size", type=int, default=8, help="rows decoded together per replica (default: 8)")
    compute.add_argument("--replicas", default="1",
                         help="model replicas: N, or MIN,MAX to autoscale between them (default: 1)")
    compute.add_argument("--tp", type=int, default=1,
                         help="tensor-parallel ranks per replica, placed on one node (default: 1)")
    compute.add_argument("--cpu-workers", default="1,2",
                         help="image preprocessing actors: N or MIN,MAX (default: 1,2)")
    compute.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                         help="auto = cuda when the cluster has GPUs, else cpu")
    compute.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                         help="auto = bfloat16 on cuda, float32 on cpu")
    compute.add_argument("--torch-threads", type=int, default=None,
                         help="CPU threads per rank (default: the node's cores divided by --tp)")
    compute.add_argument("--compile", action="store_true",
                         help="torch.compile the VQ encoder in each replica (tens of seconds once; pays on long jobs)")
    compute.add_argument("--vq-cache-size", type=int, default=4096,
                         help="images whose VQ tokens each replica keeps (LRU by content hash), so an image "
                              "shared by many rows is encoded once; 0 keeps none between batches (an image "
                              "repeated within one batch is still encoded once) (default: 4096, ~8 KiB each)")
    compute.add_argument("--save-token-ids", action="store_true", help="also write output_token_ids")


def options_from_args(args: argparse.Namespace, **overrides: Any) -> CaptionOptions:
    missing = [flag for flag, value in (("--input", args.input), ("--output", args.output), ("--model", args.model))
               if not value]
    if missing:
        raise OptionsError(f"missing required flag(s): {', '.join(missing)}")
    generation = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, text_completion=args.text_completion,
    )
    values = dict(
        inputs=tuple(args.input), output=args.output, model=args.model, id_column=args.id_column,
        image_column=args.image_column, prompt=args.prompt, keep_columns=tuple(args.keep_columns),
        generation=generation, batch_size=args.batch_size, replicas=parse_range(args.replicas, "--replicas"),
        tp=args.tp, cpu_workers=parse_range(args.cpu_workers, "--cpu-workers"), device=args.device,
        dtype=args.dtype, limit=args.limit, rows_per_file=args.rows_per_file, save_token_ids=args.save_token_ids,
        storage=StorageOptions.from_env(args.s3_endpoint, args.s3_key, args.s3_secret, args.s3_region),
        allow_local_paths=args.allow_local_paths, force=args.force, torch_threads=args.torch_threads,
        compile=args.compile, vq_cache_size=args.vq_cache_size,
    )
    values.update(overrides)
    return CaptionOptions(**values)


def exit_on_bad_input(main: Callable[[], int]) -> int:
    """Run `main`; an OptionsError prints its message and exits with code 2 (nothing was written), a
    stage that could not start prints its cause and exits with code 1 (committed units stay resumable)."""
    from pipeline.caption import StageStartError

    try:
        return main()
    except OptionsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StageStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


__all__ = ["DEFAULT_PROMPT", "EXIT_BAD_INPUT", "EXIT_FAILED", "add_model_and_data_flags", "exit_on_bad_input", "options_from_args"]

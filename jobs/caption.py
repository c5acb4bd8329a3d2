"""Caption every image of a Parquet dataset with Chameleon on a Ray cluster.

    ray job submit --working-dir . -- python jobs/caption.py --model DIR --input s3://bucket/images/ \
        --output s3://bucket/captions/
    python jobs/caption.py --demo        # tiny random checkpoint + sample images, local Ray

Exit codes: 0 done, 2 invalid flags or input schema (nothing written), 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pipeline.caption import format_summary, run_caption_job  # noqa: E402
from pipeline.cli import add_model_and_data_flags, exit_on_bad_input, options_from_args  # noqa: E402
from pipeline.options import DEFAULT_PROMPT  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true",
                        help="run on an embedded default (tiny random checkpoint, sample images, local Ray)")
    add_model_and_data_flags(
        parser, f"prompt with one <image> per image of a row (default: {DEFAULT_PROMPT!r})", DEFAULT_PROMPT
    )
    parser.add_argument("--prompt-column", default=None,
                        help="take each row's prompt from this column instead of --prompt")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.demo:
        return run_demo(args)
    options = options_from_args(args, prompt_column=args.prompt_column)
    summary = run_caption_job(options)
    print(format_summary(summary))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from pipeline.demo import write_demo_inputs

    folder = Path(tempfile.mkdtemp(prefix="chameleon-demo-"))
    model, data = write_demo_inputs(folder)
    args.model, args.input = str(model), [str(data)]
    args.output = args.output or str(folder / "captions")
    args.keep_columns = args.keep_columns or ["file_name"]
    options = options_from_args(args, prompt_column=args.prompt_column)
    summary = run_caption_job(options)
    table = pq.read_table(options.output).sort_by("id")
    print(f"\n{table.num_rows} rows written to {options.output} (random weights: captions are noise)")
    print(table.select(["id", "caption", "finish_reason", "num_prompt_tokens", "num_generated_tokens"])
          .to_pandas().head(8).to_string(max_colwidth=40))
    print("\n" + format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(lambda: main()))

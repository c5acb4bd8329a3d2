"""Evaluate Chameleon on a VQA set (VQAv2-style Parquet) on a Ray cluster, or re-score predictions.

    ray job submit --working-dir . -- python jobs/vqa_eval.py --model DIR \
        --input s3://bucket/vqav2-val/ --output s3://bucket/vqa-eval/ --question-id-column question_id
    python jobs/vqa_eval.py --model DIR --input vqa.parquet --output out/ --metric vqa
    python jobs/vqa_eval.py --score-only out/predictions --output rescored/ --vqa-normalization lmms

Writes <output>/predictions/ (Parquet, one row per question), summary.json and report.md.
Exit codes: 0 done, 2 invalid flags or input schema (nothing written), 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pipeline.cli import add_model_and_data_flags, exit_on_bad_input  # noqa: E402
from pipeline.vqa import (  # noqa: E402
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPLATE,
    add_vqa_flags,
    format_result,
    run_vqa_eval,
    vqa_options_from_args,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_data_flags(
        parser,
        "prompt with {question} (the question text) and one <image> per image of a row "
        f"(default: {DEFAULT_TEMPLATE!r})".replace("%", "%%"),
        DEFAULT_TEMPLATE,
        prompt_flags=("--prompt-template", "--prompt"),
        default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
    )
    add_vqa_flags(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = vqa_options_from_args(parse_args(argv))
    summary = run_vqa_eval(options)
    print(format_result(summary))
    print(f"wrote {options.output.rstrip('/')}/summary.json, report.md and predictions/")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_bad_input(lambda: main()))

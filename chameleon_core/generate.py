"""Batched generation over left-padded prompts with a static KV cache.

Prefill runs the whole padded prompt once and keeps logits for the last position only; decode then
feeds one token per row per step. Stopping is checked on the host every `sync_every` steps (the only
host syncs of the loop); at those points finished rows are dropped from the batch so that the long
tail of a batch does not keep paying for rows that are done.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from chameleon_core.kv_cache import StaticKVCache
from chameleon_core.model import ChameleonForCausalLM, causal_padding_mask, positions_from_mask
from chameleon_core.sampling import SamplingParams, row_seed, select_tokens


@dataclass
class GenerationResult:
    token_ids: list[list[int]]  # new tokens per row, the stop token included when one was produced
    finish_reasons: list[str]  # "stop" or "length"
    num_prompt_tokens: list[int]
    prefill_s: float = 0.0  # prompt forward pass, synchronized
    decode_s: float = 0.0  # every later step, up to the returned token lists


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"):
    """(input_ids, attention_mask) of shape (B, T) with every prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def prefill_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The prompt's attention mask, or None when no row is padded (common: one prompt template and one
    image per row gives equal lengths), which lets attention use its causal kernel without a mask."""
    return None if bool(attention_mask.all()) else causal_padding_mask(attention_mask)


@torch.inference_mode()
def generate(
    model: ChameleonForCausalLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    eos_token_id: int,
    pad_token_id: int,
    seeds: Sequence[int] | None = None,
    sync_every: int = 4,
    compact_below: float = 0.75,
) -> GenerationResult:
    """Generate up to `params.max_new_tokens` tokens for every prompt (lists of token ids).

    `seeds` gives each row its own sampling seed; by default a row's seed is derived from
    `params.seed` and its prompt, so a sample never depends on the rest of the batch.
    Rows are compacted away once fewer than `compact_below` of the current batch is still running.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    device = model.device
    batch = len(prompts)
    input_ids, attention_mask = left_pad(prompts, pad_token_id, device)
    prompt_len = input_ids.shape[1]
    max_len = prompt_len + params.max_new_tokens
    if max_len > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt of {prompt_len} tokens + {params.max_new_tokens} new tokens exceeds the model's "
            f"{model.config.max_position_embeddings} positions"
        )
    if seeds is None and not params.greedy:
        seeds = [row_seed(params.seed, str(list(p))) for p in prompts]
    seed_tensor = torch.tensor(list(seeds), dtype=torch.long, device=device) if seeds is not None else None
    stop_ids = torch.tensor(sorted({eos_token_id, *params.stop_token_ids}), device=device)

    attn = model.model.layers[0].self_attn
    cache = StaticKVCache(
        len(model.model.layers), batch, attn.k_proj.weight.shape[0] // attn.head_dim, max_len, attn.head_dim,
        model.dtype, device,
    )
    positions = positions_from_mask(attention_mask)
    started = time.perf_counter()
    logits = model(
        input_ids, positions, prefill_mask(attention_mask), cache,
        torch.arange(prompt_len, device=device), prompt_len,
    )
    key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
    key_valid[:, :prompt_len] = attention_mask.bool()
    next_pos = positions[:, -1] + 1
    _synchronize(device)  # one sync per batch, so the split between prefill and decode is honest
    prefilled = time.perf_counter()

    out = torch.full((batch, params.max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.full((batch,), params.max_new_tokens, dtype=torch.long, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    columns = torch.arange(prompt_len, max_len, device=device)
    rows = torch.arange(batch, device=device)  # original row of each live batch entry
    done = torch.zeros(batch, dtype=torch.bool, device=device)  # per live entry
    for step in range(params.max_new_tokens):
        tokens = select_tokens(logits, params, seed_tensor, step)
        tokens = tokens.masked_fill(done, pad_token_id)
        out[rows, step] = tokens
        hit = torch.isin(tokens, stop_ids) & ~done
        lengths[rows[hit]] = step + 1
        stopped[rows[hit]] = True
        done |= hit
        if step + 1 == params.max_new_tokens:
            break
        if (step + 1) % sync_every == 0:
            live = (~done).nonzero().squeeze(1)
            if live.numel() == 0:
                break
            if live.numel() < compact_below * done.numel():
                cache.keep_rows(live)
                rows, done, key_valid, next_pos = rows[live], done[live], key_valid[live], next_pos[live]
                tokens = tokens[live]
                if seed_tensor is not None:
                    seed_tensor = seed_tensor[live]
        key_valid[:, prompt_len + step] = True
        logits = model(
            tokens[:, None], next_pos[:, None], key_valid[:, None, None, :], cache, columns[step : step + 1], None
        )
        next_pos = next_pos + 1

    out_list = out.tolist()
    lengths_list = lengths.tolist()
    return GenerationResult(
        token_ids=[row[:n] for row, n in zip(out_list, lengths_list)],
        finish_reasons=["stop" if s else "length" for s in stopped.tolist()],
        num_prompt_tokens=[len(p) for p in prompts],
        prefill_s=prefilled - started,
        decode_s=time.perf_counter() - prefilled,
    )

"""Tiny transformers causal LMs built from config, the policy's value head, sampling, and SFT.

No hub downloads: every model comes from `GPT2Config(...)` or `LlamaConfig(...)`.
Dropout is zero (GPT2Config defaults to 0.1, which would make the PPO ratio
differ from 1 at the first step) and the special ids are the world's, not 50256.

GPT-2 runs through `gpt2_hidden` below (model.fast_forward, on by default): the same
weights and the same function as transformers' forward, in a dozen tensor ops per
layer. At this size every forward is dominated by per-call overhead, not arithmetic:
transformers' wrappers, masks and cache objects, and CPU SDPA (3x slower than plain
matmul-softmax-matmul at 30 positions): sampling 64 x 24 tokens took 16 ms instead of
22, a forward over them 4.2 ms instead of 5.6. A test holds logits and gradients to
transformers'; fast_forward=false uses theirs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rlhf_sweep.config.schema import ModelConfig, SFTConfig
from rlhf_sweep.simulation.world import BOS, EOS, PAD, PROMPT_LEN, World


def build_lm(cfg: ModelConfig, vocab_size: int, max_len: int) -> nn.Module:
    """A causal LM with randomly initialised weights (seed torch before calling)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, vocab_size=vocab_size)
    if cfg.arch == "gpt2":
        conf = GPT2Config(
            n_positions=max_len, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
            activation_function=cfg.activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            fast_forward=cfg.fast_forward, **ids,
        )
        return GPT2LMHeadModel(conf)
    if cfg.arch == "llama":
        conf = LlamaConfig(
            hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head, hidden_act=cfg.activation,
            max_position_embeddings=max_len, attention_dropout=0.0, tie_word_embeddings=True, **ids,
        )
        return LlamaForCausalLM(conf)
    raise ValueError(f"model.arch={cfg.arch!r}: accepts gpt2 | llama")


def is_fast(lm: nn.Module) -> bool:
    return getattr(lm.config, "fast_forward", False) and lm.config.model_type == "gpt2"


class KVCache:
    """Keys and values of every layer, preallocated for the whole sequence and filled in place."""

    def __init__(self, lm: nn.Module, batch: int, max_len: int):
        c, w = lm.config, lm.transformer.wte.weight
        shape = (c.n_layer, 2, batch, c.n_head, max_len, c.n_embd // c.n_head)  # 2: keys, values
        self.kv = torch.empty(shape, dtype=w.dtype, device=w.device)
        self.length = 0  # positions filled


def _conv1d(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """GPT-2's Conv1D (weight stored in x out) as one addmm."""
    return torch.addmm(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight).view(*x.shape[:-1], -1)


def gpt2_hidden(lm: nn.Module, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
    """GPT-2's last hidden states (after ln_f) from the module's own weights.

    Without a cache: the full causal forward over input_ids (positions 0..T-1), no attention
    mask, as transformers computes it. With a cache: input_ids continue the cached sequence;
    their keys and values are written into it, and they attend to everything before them.
    """
    tr, c = lm.transformer, lm.config
    B, T = input_ids.shape
    start = cache.length if cache is not None else 0
    x = tr.wte(input_ids) + tr.wpe.weight[start : start + T]
    d = c.n_embd // c.n_head
    causal = None
    if T > 1:  # a new position sees itself and everything before it
        causal = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start).logical_not()
    for i, blk in enumerate(tr.h):
        h = F.layer_norm(x, x.shape[-1:], blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
        qkv = _conv1d(h, blk.attn.c_attn).view(B, T, 3, c.n_head, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv
        if cache is not None:
            cache.kv[i, :, :, :, start : start + T] = qkv[1:]
            k, v = cache.kv[i, :, :, :, : start + T]
        att = (q @ k.transpose(-1, -2)) * d**-0.5
        if causal is not None:
            att = att.masked_fill(causal, float("-inf"))
        a = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, c.n_embd)
        x = x + _conv1d(a, blk.attn.c_proj)
        h = F.layer_norm(x, x.shape[-1:], blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
        x = x + _conv1d(blk.mlp.act(_conv1d(h, blk.mlp.c_fc)), blk.mlp.c_proj)
    if cache is not None:
        cache.length = start + T
    return F.layer_norm(x, x.shape[-1:], tr.ln_f.weight, tr.ln_f.bias, tr.ln_f.eps)


def hidden_states(lm: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states of the backbone (no LM head)."""
    if is_fast(lm):
        return gpt2_hidden(lm, input_ids)
    return lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


def lm_logits(lm: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits at every position."""
    return lm.get_output_embeddings()(hidden_states(lm, input_ids))


class PolicyWithValue(nn.Module):
    """Policy LM plus a scalar value head on the shared backbone: one forward gives both."""

    def __init__(self, lm: nn.Module, n_embd: int):
        super().__init__()
        self.lm = lm
        self.v_head = nn.Linear(n_embd, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = hidden_states(self.lm, input_ids)
        return self.lm.get_output_embeddings()(h), self.v_head(h).squeeze(-1)


def response_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits that predict the response tokens (positions PROMPT_LEN-1 .. end-1)."""
    return logits[:, PROMPT_LEN - 1 : -1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def response_mask(responses: torch.Tensor) -> torch.Tensor:
    """1 on response tokens up to and including the first EOS, 0 after it."""
    is_eos = (responses == EOS).long()
    ended_before = torch.cumsum(is_eos, 1) - is_eos
    return (ended_before == 0).float()


def last_index(responses: torch.Tensor) -> torch.Tensor:
    """Index of the EOS (or the last token when a response never ended)."""
    return (response_mask(responses).sum(1) - 1).long()


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of probs (B, V): the first whose cumulative probability exceeds a uniform
    draw. The same distribution as torch.multinomial, at a fifth of its cost for 44 tokens."""
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=probs.dtype)
    return torch.searchsorted(probs.cumsum(-1), u, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


def decoder(lm: nn.Module, batch: int, max_len: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """step(ids) -> the last position's hidden state, each call continuing the sequence fed so far."""
    if is_fast(lm):
        cache = KVCache(lm, batch, max_len)
        return lambda ids: gpt2_hidden(lm, ids, cache)[:, -1]
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.config)  # transformers' own, updated in place
    return lambda ids: lm.base_model(input_ids=ids, cache=cache, use_cache=True).last_hidden_state[:, -1]


@torch.no_grad()  # not inference_mode: its tensors could not index the PPO loss later
def sample(
    lm: nn.Module,
    prompts: torch.Tensor,
    max_new_tokens: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    with_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ancestral sampling with the KV cache; stops as soon as every row has emitted EOS.

    Returns (B, max_new_tokens) responses, PAD after each row's EOS. Hand-written
    because it beats `generate` here and the cache argument is explicit (`cache` in
    transformers 5). with_states=True trims the responses to the steps taken (the longest
    response) and also returns, for every step, the logits (at
    temperature 1) and the last hidden state that chose the token: the same numbers a second
    forward pass over prompt+response would give, so a PPO rollout takes its log-probs,
    exact KL and values from here instead of running the policy again.
    """
    B = prompts.shape[0]
    head = lm.get_output_embeddings()
    step = decoder(lm, B, prompts.shape[1] + max_new_tokens)
    out = torch.full((B, max_new_tokens), PAD, dtype=torch.long, device=prompts.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompts.device)
    logits_seq, hidden_seq = [], []
    h = step(prompts)
    for t in range(max_new_tokens):
        logits = head(h).float()
        if with_states:
            logits_seq.append(logits)
            hidden_seq.append(h)
        tok = draw(torch.softmax(logits / temperature, -1), generator)
        tok.masked_fill_(done, PAD)
        out[:, t] = tok
        done |= tok == EOS
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        h = step(tok[:, None])
    if not with_states:
        return out
    return out[:, : t + 1], torch.stack(logits_seq, 1), torch.stack(hidden_seq, 1)


def train_sft(
    lm: nn.Module,
    world: World,
    cfg: SFTConfig,
    rng: np.random.Generator,
    device: torch.device,
    progress: bool = True,
) -> dict[str, float]:
    """Teacher-forced cross-entropy on demonstrations (response tokens incl. EOS)."""
    prompts = world.sample_prompts(cfg.n_demos, rng)
    demos = world.demonstrations(prompts, rng)
    width = int(response_mask(demos).sum(1).max())  # train on the used width only
    seqs = torch.cat([prompts, demos[:, :width]], 1).to(device)
    mask = response_mask(demos[:, :width]).to(device)
    opt = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = max(1, cfg.n_demos // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.1)
    lm.train()
    losses = []
    bar = tqdm(total=total, desc="SFT reference", disable=not progress, leave=False)
    for _ in range(cfg.epochs):
        perm = torch.from_numpy(rng.permutation(cfg.n_demos)).to(device)
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            logits = response_logits(lm_logits(lm, seqs[idx]))
            nll = F.cross_entropy(logits.transpose(1, 2), seqs[idx, PROMPT_LEN:], reduction="none")
            loss = (nll * mask[idx]).sum() / mask[idx].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
    bar.close()
    lm.eval()
    return {"sft/loss": float(np.mean(losses[-steps_per_epoch:]))}

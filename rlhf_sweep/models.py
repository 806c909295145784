"""Tiny transformers causal LMs built from config, the policy's value head, sampling, and SFT.

No hub downloads: every model comes from `GPT2Config(...)` or `LlamaConfig(...)`.
Dropout is zero (GPT2Config defaults to 0.1, which would make the PPO ratio
differ from 1 at the first step) and the special ids are the world's, not 50256.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import ModelConfig, SFTConfig
from .world import BOS, EOS, PAD, PROMPT_LEN, World


def build_lm(cfg: ModelConfig, vocab_size: int, max_len: int) -> nn.Module:
    """A causal LM with randomly initialised weights (seed torch before calling)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, vocab_size=vocab_size)
    if cfg.arch == "gpt2":
        conf = GPT2Config(
            n_positions=max_len, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
            activation_function=cfg.activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
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


def hidden_states(lm: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states of the backbone (no LM head)."""
    return lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


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
    backbone, head = lm.base_model, lm.get_output_embeddings()
    out = torch.full((B, max_new_tokens), PAD, dtype=torch.long, device=prompts.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompts.device)
    logits_seq, hidden_seq = [], []
    res = backbone(input_ids=prompts, use_cache=True)
    for t in range(max_new_tokens):
        h = res.last_hidden_state[:, -1]
        logits = head(h).float()
        if with_states:
            logits_seq.append(logits)
            hidden_seq.append(h)
        tok = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(1)
        tok = torch.where(done, torch.full_like(tok, PAD), tok)
        out[:, t] = tok
        done |= tok == EOS
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        res = backbone(input_ids=tok[:, None], cache=res.cache, use_cache=True)
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
            logits = response_logits(lm(input_ids=seqs[idx], use_cache=False).logits)
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

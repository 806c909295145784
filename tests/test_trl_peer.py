"""Our RLOO, GRPO and DPO/IPO losses against TRL's on the same tensors.

TRL 1.16 exposes these computations only inside its trainers: each trainer's public `compute_loss(model,
inputs)` takes the batch tensors its generation step would have made (token ids, masks, advantages, old and
reference log-probs), so both sides get the same tensors here, and our loss is computed from the same
model's log-probabilities. The advantage rules (RLOO's leave-one-out baseline, GRPO's group normalisation)
are inline in TRL's generation step, not callable on tensors: tests/test_algos.py checks them against hand
computations, and rloo.py / grpo.py cite the paper equation and TRL's line for each.

TRL is the optional `bench` extra (pip install -e .[bench]); without it these tests skip. CI installs `.[dev]`
only, so they run where the bench extra is installed, not in CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from rlhf_sweep.config.compose import compose  # noqa: E402
from rlhf_sweep.maths import kl as klmod  # noqa: E402
from rlhf_sweep.models.lm import build_lm  # noqa: E402
from rlhf_sweep.simulation.world import World  # noqa: E402
from rlhf_sweep.training import dpo, grpo, rloo  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
B, P, T = 4, 5, 6  # completions, prompt tokens, completion tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 of our config (transformers' forward, so TRL runs the same function) and a tokenizer over
    the world's token ids, saved where TRL's trainers load them."""
    sys.path.insert(0, str(ROOT / "bench"))
    from run import vocab_tokenizer  # the bench's TRL setup

    cfg = compose(["model.fast_forward=false"])
    world = World(cfg.world)
    d = tmp_path_factory.mktemp("trl") / "model"
    vocab_tokenizer(world, d)
    torch.manual_seed(0)
    build_lm(cfg.model, world.vocab.size, 64).save_pretrained(d)
    return d


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0  # a response that ended early
    return {"prompt_ids": torch.randint(4, 40, (B, P), generator=g), "prompt_mask": torch.ones(B, P, dtype=torch.long),
            "completion_ids": torch.randint(4, 40, (B, T), generator=g), "completion_mask": mask,
            "advantages": torch.tensor([1.0, -0.5, 0.3, -2.0]),
            # old and reference log-probs near the model's (about -3.7 per token), so some ratios clip and some do not
            "old": -3.7 + 0.3 * torch.randn(B, T, generator=g), "ref": -3.7 + 0.5 * torch.randn(B, T, generator=g)}


def our_logprobs(model, x: dict) -> torch.Tensor:
    seqs = torch.cat([x["prompt_ids"], x["completion_ids"]], 1)
    logits = model(seqs).logits[:, P - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, x["completion_ids"].unsqueeze(-1)).squeeze(-1)


def grads(model, loss: torch.Tensor) -> torch.Tensor:
    """The loss's gradient over every parameter, flattened (the model's gradients are cleared first)."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def trainer(kind: str, model_dir: Path, tmp_path: Path, **args):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    common = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False, fp16=False, save_strategy="no")
    if kind == "dpo":
        data = Dataset.from_dict({"prompt": ["t1 t4 t12 t2"] * 4, "chosen": ["t20 t3"] * 4, "rejected": ["t21 t22 t3"] * 4})
        t = trl.DPOTrainer(model=str(model_dir), args=trl.DPOConfig(**common, **args), train_dataset=data, processing_class=tok)
    else:
        data = Dataset.from_dict({"prompt": ["t1 t4 t12 t2"] * 8})
        conf, cls = (trl.GRPOConfig, trl.GRPOTrainer) if kind == "grpo" else (trl.RLOOConfig, trl.RLOOTrainer)
        t = cls(model=str(model_dir), reward_funcs=lambda completions, **kw: [0.0] * len(completions), train_dataset=data,
                processing_class=tok, args=conf(**common, per_device_train_batch_size=4, num_generations=4,
                                                max_completion_length=T, disable_dropout=True, **args))
    t.model.eval()  # eval mode: no gradient-accumulation scaling inside compute_loss
    return t


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_grpo_loss_equals_trls(model_dir, tmp_path, loss_type, bias_correction):
    t = trainer("grpo", model_dir, tmp_path, beta=0.04, epsilon=0.2, loss_type=loss_type,
                use_bias_correction_kl=bias_correction)
    x = tensors()
    mask = x["completion_mask"]
    inputs = {k: x[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")}
    inputs.update(old_per_token_logps=x["old"], ref_per_token_logps=x["ref"], num_items_in_batch=mask.sum())
    theirs = t.compute_loss(t.model, inputs)
    their_grad = grads(t.model, theirs)

    lp = our_logprobs(t.model, x)
    kl_t = klmod.per_token("k3", lp, x["ref"])
    if bias_correction:
        kl_t = grpo.bias_corrected(kl_t, lp, x["old"])
    # dr_grpo divides by max_completion_length; dapo (in eval) by the batch's tokens
    ours, _ = grpo.grpo_loss(lp, x["old"], x["advantages"], mask.float(), 0.2, None, kl_t, 0.04, loss_type, T,
                             float(mask.sum()))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    # the bias correction changes the gradient, not only the value: compare those too
    assert torch.allclose(grads(t.model, ours), their_grad, rtol=1e-4, atol=1e-7)


def test_rloo_loss_equals_trls(model_dir, tmp_path):
    t = trainer("rloo", model_dir, tmp_path, beta=0.05, epsilon=0.2)
    x = tensors(1)
    mask = x["completion_mask"]
    inputs = {k: x[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")}
    inputs["old_logps"] = (x["old"] * mask).sum(1)  # TRL's RLOO keeps sequence log-probs
    theirs = t.compute_loss(t.model, inputs)
    their_grad = grads(t.model, theirs)
    ours, _ = rloo.sequence_loss(our_logprobs(t.model, x), x["old"], x["advantages"], mask.float(), 0.2)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(grads(t.model, ours), their_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 1.0), ("ipo", 0.1), ("ipo", 2.0)])
def test_dpo_and_ipo_losses_equal_trls(model_dir, tmp_path, loss_type, beta):
    t = trainer("dpo", model_dir, tmp_path, beta=beta, loss_type=[loss_type], precompute_ref_log_probs=False)
    batch = t.data_collator([t.train_dataset[i] for i in range(2)])  # [chosen..., rejected...]: TRL's own tensors
    # the reference differs from the policy, so the log-ratios are not zero: a second, perturbed copy
    with torch.no_grad():
        for p in t.ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    theirs = t.compute_loss(t.model, batch).item()

    ids, cmask = batch["input_ids"], batch["completion_mask"]
    with torch.no_grad():
        def seq_logps(model):
            logp = torch.log_softmax(model(ids, attention_mask=batch["attention_mask"]).logits[:, :-1].float(), -1)
            tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            return (tok * cmask[:, 1:]).sum(1)

        s = seq_logps(t.model) - seq_logps(t.ref_model)
    s_w, s_l = s.chunk(2)
    n_w, n_l = cmask[:, 1:].sum(1).float().chunk(2)
    ours = dpo.pair_loss(loss_type, s_w, s_l, n_w, n_l, beta).mean()
    assert ours.item() == pytest.approx(theirs, rel=1e-5, abs=1e-6)

"""DPOModule with a tiny model: frozen reference, shared features, memo, checkpoints and resume."""
import json
import math
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import lightning_modules.dpo as dpo_module
from genloc.checkpoint import model_state_dict, read_checkpoint, save_model_checkpoint
from genloc.hub import load_location_model
from lightning_modules.dpo import DPOModule, pair_box_log_probs, pair_boxes
from lightning_modules.mle import MLEModule
from genloc import LocationModelConfig
from tests.helpers.batches import OPTIM, pair_batch

def _save_mle(path, **overrides):
    torch.manual_seed(0)
    module = MLEModule(model_config=LocationModelConfig.preset("tiny", **overrides).to_dict(), optim=OPTIM)
    save_model_checkpoint(module.model, path)
    return path


@pytest.fixture(scope="module")
def mle_ckpt(tmp_path_factory):
    return str(_save_mle(tmp_path_factory.mktemp("mle") / "mle.ckpt"))


def loader(n_batches):
    return DataLoader([pair_batch(i) for i in range(n_batches)], batch_size=None, collate_fn=lambda b: b)


def trainer(max_steps, **kwargs):
    kwargs = {"logger": False, "enable_checkpointing": False, **kwargs}
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **kwargs)


def reference_params(module):
    return {n: p.detach().clone() for n, p in module.reference.model.named_parameters()}


def test_policy_equal_reference_gives_log2_and_zero_rewards(mle_ckpt):
    module = DPOModule(optim=OPTIM, beta=0.3, reference=mle_ckpt).train()  # dropout off in the policy
    stats = module.dpo_metrics(pair_batch(0))
    assert stats["loss"].item() == pytest.approx(math.log(2), abs=1e-5)
    assert stats["rewards/chosen"].item() == pytest.approx(0, abs=1e-6)
    assert stats["rewards/margins"].item() == pytest.approx(0, abs=1e-6)
    # the reference log-probs from shared features equal an end-to-end pass of the reference
    batch = pair_batch(1)
    lp = module.pair_log_probs(batch)
    ref = module.reference.model
    tok = ref.tokenizer.encode(batch["rejected"])
    direct = ref(batch["image"], batch["category"], tok).sum(-1)
    assert torch.allclose(lp["ref_rejected"], direct, atol=1e-5)


def test_sft_weight_adds_the_chosen_per_token_nll(mle_ckpt):
    batch = pair_batch(2)
    plain = DPOModule(optim=OPTIM, beta=0.3, reference=mle_ckpt).train()
    with_sft = DPOModule(optim=OPTIM, beta=0.3, reference=mle_ckpt, sft_weight=0.5).train()
    chosen_logp = plain.pair_log_probs(batch)["policy_chosen"]  # summed over the 4 box tokens
    expected = math.log(2) + 0.5 * (-chosen_logp.mean().item() / 4)
    assert with_sft.dpo_metrics(batch)["loss"].item() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="sft_weight"):
        DPOModule(optim=OPTIM, beta=0.3, reference=mle_ckpt, sft_weight=-1.0)


def test_steps_train_every_policy_parameter_and_never_the_reference(mle_ckpt):
    module = DPOModule(optim=OPTIM, beta=0.5, reference=mle_ckpt)
    policy_before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    ref_before = reference_params(module)
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and not any(p.requires_grad for p in module.reference.parameters())

    # one step by hand: every trainable parameter gets a gradient (DDP needs no find_unused_parameters)
    module.dpo_metrics(pair_batch(0))["loss"].backward()
    no_grad = [n for n, p in module.model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad
    module.zero_grad(set_to_none=True)

    fit = trainer(3)
    fit.fit(module, train_dataloaders=loader(3))
    assert fit.global_step == 3
    optimised = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in module.reference.parameters()}
    unchanged = [n for n in trainable if torch.equal(policy_before[n], dict(module.model.named_parameters())[n])]
    assert not unchanged
    for name, param in module.reference.model.named_parameters():
        assert torch.equal(param, ref_before[name]), name
    assert not module.reference.training and not module.reference.model.decoder.training
    module.reference.train()
    assert not module.reference.training


def test_checkpoint_has_no_reference_and_resume_rebuilds_it(mle_ckpt, tmp_path):
    module = DPOModule(optim=OPTIM, beta=0.5, reference=mle_ckpt)
    n_model = len(module.model.state_dict())
    assert len(module.state_dict()) == n_model  # the reference is not a registered child
    ckpt_dir = tmp_path / "ckpt"
    fit = trainer(2, enable_checkpointing=True,
                  callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1)])
    fit.fit(module, train_dataloaders=loader(2))
    last = ckpt_dir / "last.ckpt"
    ckpt = read_checkpoint(last)
    assert len(ckpt["state_dict"]) == n_model and all(k.startswith("model.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["model_config"] == read_checkpoint(mle_ckpt)["hyper_parameters"]["model_config"]
    trained = {k: v.clone() for k, v in module.model.state_dict().items()}
    assert torch.equal(load_location_model(last).state_dict()["image_proj.weight"], trained["image_proj.weight"])

    # load_from_checkpoint: policy from the DPO checkpoint, reference rebuilt from its MLE path
    restored = DPOModule.load_from_checkpoint(last)
    mle_weights = model_state_dict(read_checkpoint(mle_ckpt))
    assert torch.equal(restored.model.state_dict()["image_proj.weight"], trained["image_proj.weight"])
    assert torch.equal(restored.reference.model.state_dict()["image_proj.weight"], mle_weights["image_proj.weight"])
    assert not torch.equal(trained["image_proj.weight"], mle_weights["image_proj.weight"])

    # resume as train.py does: a fresh module from the config, fit(ckpt_path=last) continues the run
    resumed = DPOModule(optim=OPTIM, beta=0.5, reference=mle_ckpt)
    ref_before = reference_params(resumed)
    fit2 = trainer(3)
    fit2.fit(resumed, train_dataloaders=loader(3), ckpt_path=str(last))
    assert fit2.global_step == 3
    assert all(torch.equal(p, ref_before[n]) for n, p in resumed.reference.model.named_parameters())
    assert torch.equal(resumed.reference.model.state_dict()["image_proj.weight"], mle_weights["image_proj.weight"])


def test_precomputed_reference_is_exact_and_keeps_flips_apart(mle_ckpt, monkeypatch):
    module = DPOModule(optim=OPTIM, beta=0.5, reference=mle_ckpt, precompute_reference=True)
    plain = DPOModule(optim=OPTIM, beta=0.5, reference=mle_ckpt)
    batch = pair_batch(0)
    calls = []  # rows scored by the reference

    def counting(model, prefix, *boxes):
        if model is module.reference.model:
            calls.append(len(prefix))
        return pair_box_log_probs(model, prefix, *boxes)

    monkeypatch.setattr(dpo_module, "pair_box_log_probs", counting)
    first = module.pair_log_probs(batch)
    assert calls == [4]  # the 4 pairs' chosen and rejected boxes scored once, then memoised
    for name in ("ref_chosen", "ref_rejected"):
        assert torch.allclose(first[name], plain.pair_log_probs(batch)[name], atol=1e-6)

    calls.clear()
    again = module.pair_log_probs(batch)
    assert calls == []  # all from the memo
    assert torch.equal(again["ref_chosen"], first["ref_chosen"])

    # a flipped image under the same key and boxes is another input; a re-drawn pair mixes hits and misses
    flipped = dict(batch, image=batch["image"].flip(-1))
    redrawn = dict(batch, rejected=batch["rejected"].roll(1, 0))
    for new in (flipped, redrawn):
        out = module.pair_log_probs(new)
        expected = plain.pair_log_probs(new)
        for name in ("ref_chosen", "ref_rejected"):
            assert torch.allclose(out[name], expected[name], atol=1e-6)
    assert calls == [4, 4]
    assert not torch.allclose(module.pair_log_probs(flipped)["ref_chosen"], first["ref_chosen"])


def test_trainable_encoders_get_their_own_reference_pass(tmp_path):
    ckpt = str(_save_mle(tmp_path / "mle_unfrozen.ckpt", freeze_image_encoder=False))
    module = DPOModule(optim=OPTIM, beta=0.5, reference=ckpt)
    batch = pair_batch(0)
    optimiser = torch.optim.SGD([p for p in module.model.image_encoder.parameters()], lr=1.0)
    module.dpo_metrics(batch)["loss"].backward()
    assert module.model.image_encoder.patch_embed.proj.weight.grad is not None
    optimiser.step()  # the policy's image encoder now differs from the reference's
    lp = module.pair_log_probs(batch)
    ref = module.reference.model
    direct = ref(batch["image"], batch["category"], ref.tokenizer.encode(batch["chosen"])).sum(-1)
    assert torch.allclose(lp["ref_chosen"], direct, atol=1e-5)
    assert not torch.allclose(lp["policy_chosen"], direct, atol=1e-3)


def test_missing_pairs_and_bad_settings_raise(mle_ckpt, tmp_path):
    module = DPOModule(optim=OPTIM, beta=0.5, reference=mle_ckpt)
    batch = pair_batch(0)
    del batch["rejected"]
    with pytest.raises(KeyError, match="pairs=True"):
        module.dpo_metrics(batch)
    with pytest.raises(ValueError, match="loss_type"):
        DPOModule(optim=OPTIM, beta=0.5, reference=mle_ckpt, loss_type="kto")
    with pytest.raises(RuntimeError, match="does not exist"):
        DPOModule(optim=OPTIM, beta=0.5, reference=str(tmp_path / "missing.ckpt"))


def test_shared_prefix_scoring_equals_box_log_probs(mle_ckpt):
    module = DPOModule(optim=OPTIM, beta=0.5, reference=mle_ckpt)
    model, batch = module.model, pair_batch(2)
    prefix = model.build_prefix(model.encode_images(batch["image"]), model.encode_texts(batch["category"]))
    chosen, rejected = model.tokenizer.encode(batch["chosen"]), model.tokenizer.encode(batch["rejected"])
    shared = pair_box_log_probs(model, prefix, pair_boxes(chosen, rejected, model.cfg.num_bins))
    grad_shared = torch.autograd.grad(shared.sum(), model.image_proj.weight, retain_graph=True)[0]
    direct = torch.stack([model.box_log_probs(prefix, chosen).sum(-1), model.box_log_probs(prefix, rejected).sum(-1)], 1)
    grad_direct = torch.autograd.grad(direct.sum(), model.image_proj.weight)[0]
    assert torch.allclose(shared, direct, atol=1e-5)
    assert torch.allclose(grad_shared, grad_direct, atol=1e-5)


DDP_SCRIPT = textwrap.dedent('''
    import json, sys
    import lightning as L, torch
    from torch.utils.data import DataLoader
    from lightning_modules.dpo import DPOModule
    from tests.helpers.batches import OPTIM, pair_batch

    if __name__ == "__main__":
        out, ckpt = sys.argv[1], sys.argv[2]
        module = DPOModule(optim=OPTIM, beta=0.5, reference=ckpt)
        ref = {n: p.clone() for n, p in module.reference.model.named_parameters()}
        t = L.Trainer(max_steps=2, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0)
        rank_seed = 100 * int(__import__("os").environ.get("LOCAL_RANK", 0))
        batches = [pair_batch(rank_seed + i) for i in range(2)]
        t.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
        json.dump({"metrics": {k: float(v) for k, v in t.callback_metrics.items()},
                   "policy": float(sum(p.double().sum() for p in module.model.parameters())),
                   "ref_unchanged": all(torch.equal(p, ref[n]) for n, p in module.reference.model.named_parameters()),
                   "ref_device": str(module.reference.model.image_proj.weight.device)},
                  open(f"{out}/rank{t.global_rank}.json", "w"))
''')


@pytest.mark.slow
def test_ddp_two_ranks_no_unused_parameters_and_global_metrics(mle_ckpt, tmp_path):
    """find_unused_parameters=False (Lightning's ddp default) fails at step 2 if a trainable
    parameter got no gradient; metrics are reduced over both ranks, so every rank logs the same."""
    (tmp_path / "run.py").write_text(DDP_SCRIPT)
    r = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path), mle_ckpt], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["policy"] == ranks[1]["policy"]  # gradients were all-reduced
    assert all(x["ref_unchanged"] for x in ranks)
    for name in ("train/loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert ranks[0]["metrics"][name] == pytest.approx(ranks[1]["metrics"][name], abs=1e-6), name

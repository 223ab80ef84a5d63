"""LocationModel: config/presets, conditioning, likelihood, training signal, freezing, weight loading."""
import socket

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from genloc import LocationModel, LocationModelConfig, PretrainedWeightsError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LocationModel(LocationModelConfig.preset("tiny")).eval()


def _batch(batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, 64, 64, generator=gen)
    categories = ["dog", "cat", "dog", "person", "car", "cup"][:batch]
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0], [0.6, 0.3, 0.7, 0.45],
                          [0.2, 0.5, 0.4, 0.6], [0.7, 0.7, 0.95, 0.99], [0.3, 0.1, 0.35, 0.3]])[:batch]
    return images, categories, boxes


# ------------------------------------------------------------------------------------------- config
def test_presets_and_serialisation():
    tiny = LocationModelConfig.preset("tiny", num_bins=32)
    assert tiny.num_bins == 32 and tiny.image_size == 64 and tiny.vit_weights is None
    paper = LocationModelConfig.preset("paper")
    assert (paper.vit, paper.clip_model, paper.gpt2_n_layer, paper.gpt2_n_embd) == \
        ("vit_base_patch16_224", "ViT-B-32", 12, 768)
    assert LocationModelConfig.from_dict(paper.to_dict()) == paper
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bogus', 'nbins'\]"):
        LocationModelConfig.from_dict({**tiny.to_dict(), "nbins": 3, "bogus": 1})
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        LocationModelConfig.preset("huge")


@pytest.mark.parametrize("override, message", [
    (dict(num_bins=1), "num_bins"),
    (dict(gpt2_n_embd=130), "divisible"),
    (dict(image_size=60), "multiple of"),
    (dict(prompt_template="a photo"), "category"),
    (dict(freeze_image_encoder="yes"), "bool"),
    (dict(vit_weights=""), "vit_weights"),
    (dict(vit_kwargs={"patch_size:4": None}), "space after each colon"),
])
def test_config_validation(override, message):
    with pytest.raises(ValueError, match=message):
        LocationModelConfig.preset("tiny", **override)


# -------------------------------------------------------------------------------------- conditioning
def test_prefix_layout_and_positions(model):
    images, categories, _ = _batch()
    img = model.encode_images(images)
    txt = model.encode_texts(categories)
    assert img.shape == (3, 16, 128) and not img.requires_grad  # 64 px, patch 16
    assert txt.shape == (3, model.text_encoder.output_dim)
    prefix = model.build_prefix(img, txt)
    assert prefix.shape == (3, 17, 128) == (3, model.prefix_len, model.cfg.gpt2_n_embd)
    assert torch.equal(prefix[:, 0], model.text_proj(txt))
    assert torch.equal(prefix[:, 1:], model.image_proj(img))
    assert model.decoder.config.n_positions == model.prefix_len + 5
    assert model.decoder.config.vocab_size == model.tokenizer.vocab_size == 66
    # the ViT sees mean/std-normalised pixels: a constant image at the mean is a zero input
    mean_image = model.image_mean.expand(1, 3, 64, 64)
    ref = model.image_encoder.forward_features(torch.zeros(1, 3, 64, 64))[:, model.image_encoder.num_prefix_tokens:]
    assert torch.allclose(model.encode_images(mean_image), ref)


def test_text_features_are_cached_per_category(model):
    calls = []
    handle = model.text_encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        model.load_state_dict(model.state_dict())  # loading weights empties the cache earlier tests filled
        first = model.encode_texts(["dog", "cat", "dog"])
        second = model.encode_texts(["cat", "dog"])
        assert calls == [2]  # one batch of the 2 distinct prompts, nothing recomputed afterwards
        assert torch.equal(first[0], first[2]) and torch.equal(second[0], first[1])
        ids = open_clip.get_tokenizer(model.cfg.clip_model)(["a photo of a dog"])
        assert torch.allclose(first[0], model.text_encoder(ids)[0], atol=1e-5)  # batch-size-dependent fp32 kernels
        calls.clear()
        model.load_state_dict(model.state_dict())  # new weights invalidate the cache
        model.encode_texts(["dog"])
        assert calls == [1]
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------- likelihood
def test_box_log_probs_are_masked_distributions(model):
    images, categories, boxes = _batch()
    tokens = model.tokenizer.encode(boxes)
    logp = model(images, categories, tokens)
    assert logp.shape == (3, 4) and (logp < 0).all()
    prefix = model.build_prefix(model.encode_images(images), model.encode_texts(categories))
    assert torch.allclose(model.box_log_probs(prefix, tokens), logp)
    token_logp, dist = model.box_log_probs(prefix, tokens, with_distribution=True)
    assert dist.shape == (3, 4, 66) and torch.allclose(dist.exp().sum(-1), torch.ones(3, 4), atol=1e-5)
    assert torch.equal(dist.gather(-1, tokens[..., None]).squeeze(-1), token_logp)
    assert (dist[:, :, 64:] == float("-inf")).all()  # BOS/EOS are never box tokens
    # the x2 distribution given x1 sums to one over x2 > x1 only
    x1 = tokens[0, 0].item()
    candidates = tokens[:1].repeat(64 - x1 - 1, 1)
    candidates[:, 2] = torch.arange(x1 + 1, 64)
    x2_logp = model.box_log_probs(prefix[:1].expand(len(candidates), -1, -1), candidates)[:, 2]
    assert torch.allclose(x2_logp.exp().sum(), torch.tensor(1.0), atol=1e-5)
    with pytest.raises(ValueError, match="not a valid box"):
        model.box_log_probs(prefix[:1], torch.tensor([[10, 10, 10, 20]]))
    with pytest.raises(ValueError, match="not a valid box"):
        model.box_log_probs(prefix[:1], torch.tensor([[63, 10, 63, 20]]))


def test_overfitting_a_few_boxes_lowers_the_loss():
    torch.manual_seed(0)
    model = LocationModel(LocationModelConfig.preset("tiny", gpt2_dropout=0.0))
    images, categories, boxes = _batch(batch=4)
    tokens = model.tokenizer.encode(boxes)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(30):
        loss = -model(images, categories, tokens).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


# -------------------------------------------------------------------------------------------- freezing
def test_frozen_encoders_get_no_gradient_and_stay_in_eval(model):
    model.train()
    try:
        assert not model.image_encoder.training and not model.text_encoder.training
        assert model.decoder.training
        images, categories, boxes = _batch()
        model.zero_grad(set_to_none=True)
        model(images, categories, model.tokenizer.encode(boxes)).sum().backward()
        assert all(p.grad is None for p in model.image_encoder.parameters())
        assert all(p.grad is None for p in model.text_encoder.parameters())
        for part in (model.image_proj, model.text_proj, model.decoder):
            assert all(p.grad is not None for p in part.parameters())
        assert model.image_proj.weight.grad.abs().sum() > 0 and model.text_proj.weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_unfrozen_encoders_train():
    torch.manual_seed(0)
    cfg = LocationModelConfig.preset("tiny", freeze_image_encoder=False, freeze_text_encoder=False)
    model = LocationModel(cfg).train()
    assert model.image_encoder.training and model.text_encoder.training
    images, categories, boxes = _batch()
    calls = []
    model.text_encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    model(images, categories, model.tokenizer.encode(boxes)).sum().backward()
    assert model.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.text_encoder.token_embedding.weight.grad.abs().sum() > 0
    model.encode_texts(categories)
    assert len(calls) == 2  # a trained text encoder is run every time: its features are never cached


# --------------------------------------------------------------------------------------- weight loading
def test_loads_parts_from_local_folders_in_their_own_formats(tmp_path, model):
    cfg = model.cfg
    timm.models.save_for_hf(model.image_encoder, tmp_path / "vit")  # timm hub format: config.json + safetensors
    clip = open_clip.create_model(cfg.clip_model)  # a full open_clip CLIP checkpoint (image tower included)
    clip.load_state_dict({**clip.state_dict(), **model.text_encoder.state_dict()})
    save_file(clip.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    model.decoder.save_pretrained(tmp_path / "gpt2")

    loaded_cfg = LocationModelConfig.from_dict({
        **cfg.to_dict(), "pretrained": True, "vit_weights": str(tmp_path / "vit"),
        "clip_weights": str(tmp_path / "open_clip_model.safetensors"), "gpt2_weights": str(tmp_path / "gpt2")})
    torch.manual_seed(123)  # different random init: everything must come from the files
    loaded = LocationModel(loaded_cfg).eval()
    loaded.image_proj.load_state_dict(model.image_proj.state_dict())
    loaded.text_proj.load_state_dict(model.text_proj.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    images, categories, boxes = _batch()
    tokens = model.tokenizer.encode(boxes)
    # reloading its weights empties its text cache: both encode the same prompt batches (batch size changes rounding)
    model.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(images, categories, tokens), model(images, categories, tokens))
    a = model.sample(images, categories, n=20, generator=torch.Generator().manual_seed(5))
    b = loaded.sample(images, categories, n=20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.log_probs, b.log_probs)


@pytest.mark.parametrize("override, names", [
    (dict(vit_weights="augreg_in21k_ft_in1k"), ["vit_weights", "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"]),
    (dict(clip_model="ViT-B-32", clip_weights="openai"), ["clip_weights", "timm/vit_base_patch32_clip_224.openai"]),
    (dict(gpt2_weights="openai-community/gpt2"), ["gpt2_weights", "openai-community/gpt2"]),
])
def test_offline_missing_weights_fail_at_once_with_instructions(tmp_path, monkeypatch, override, names):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty hub cache
    connects = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: connects.append(addr))
    with pytest.raises(PretrainedWeightsError) as info:
        LocationModel(LocationModelConfig.preset("tiny", **override))
    message = str(info.value)
    for name in names + ["HF_HUB_OFFLINE", "download", str(tmp_path)]:
        assert name in message
    assert connects == []


def test_unknown_weights_name_is_reported():
    with pytest.raises(PretrainedWeightsError, match="neither an existing path nor a timm pretrained tag"):
        LocationModel(LocationModelConfig.preset("tiny", vit_weights="/no/such/vit.safetensors"))
    with pytest.raises(PretrainedWeightsError, match="not a GPT-2 `save_pretrained` folder"):
        LocationModel(LocationModelConfig.preset("tiny", gpt2_weights="/"))


# ------------------------------------------------------------------------------------------ paper preset
def test_paper_preset_builds_with_random_weights_and_counts_add_up():
    cfg = LocationModelConfig.preset("paper", pretrained=False)
    model = LocationModel(cfg)
    total = sum(p.numel() for p in model.parameters())

    def count(module):
        return sum(p.numel() for p in module.parameters())

    # the parts, built independently on the meta device (shapes only)
    with torch.device("meta"):
        vit = count(timm.create_model("vit_base_patch16_224", num_classes=0))
        gpt2 = count(GPT2LMHeadModel(GPT2Config(vocab_size=258, n_positions=197 + 5)))
    clip = open_clip.create_model("ViT-B-32", device="meta")
    text = count(clip) - count(clip.visual) - clip.logit_scale.numel()
    projections = (768 * 768 + 768) + (512 * 768 + 768)
    parts = vit + text + gpt2 + projections
    assert abs(total - parts) <= 0.05 * parts, (total, parts)
    assert 200e6 < total < 260e6
    assert count(model.image_encoder) == vit and count(model.text_encoder) == text and count(model.decoder) == gpt2


def test_ordinal_init_makes_nearby_bins_similar_and_keeps_norms():
    from genloc.pretrained import ordinal_init

    torch.manual_seed(0)
    embedding = torch.nn.Embedding(66, 128)
    norms_before = embedding.weight[:64].norm(dim=1).mean()
    ordinal_init(embedding, 64)
    rows = torch.nn.functional.normalize(embedding.weight[:64], dim=1)
    similarity = rows @ rows.T
    assert similarity[10, 11] > similarity[10, 20] > similarity[10, 50]
    assert torch.allclose(embedding.weight[:64].norm(dim=1), norms_before.expand(64), rtol=1e-5)
    assert not torch.equal(rows[5], rows[6])  # every bin keeps its own embedding


def test_relative_extents_reindex_the_x2_y2_outputs_and_embed_the_width():
    torch.manual_seed(0)
    model = LocationModel(LocationModelConfig.preset("tiny", num_bins=16, relative_extents=True)).eval()
    vocab = model.tokenizer.vocab_size
    outputs = torch.randn(2, vocab)
    prev = torch.tensor([[5, 2, 9], [0, 13, 3]])  # x1, y1 (and x2) chosen so far
    assert torch.equal(model.step_logits(1, outputs, prev[:, :1]), outputs)  # x1/y1 steps: as they are
    x2 = model.step_logits(2, outputs, prev[:, :2])
    y2 = model.step_logits(3, outputs, prev)
    # output e is the logit of token start + 1 + e; tokens at or before the start, BOS and EOS: -inf
    assert torch.equal(x2[0, 6:16], outputs[0, 0:10]) and torch.isinf(x2[0, :6]).all()
    assert torch.equal(y2[1, 14:16], outputs[1, 0:2]) and torch.isinf(y2[1, :14]).all()
    assert torch.isinf(x2[:, 16:]).all()
    # the x2 input carries the width x2 - x1 - 1 = 3; BOS, x1 and y1 inputs are plain token embeddings
    tokens = torch.tensor([[5, 2, 9]])
    embeds = model.input_embeds(tokens)
    plain = model.decoder.get_input_embeddings()(torch.tensor([[model.tokenizer.bos, 5, 2, 9]]))
    assert torch.equal(embeds[:, :3], plain[:, :3])
    assert torch.allclose(embeds[0, 3], plain[0, 3] + model.extent_embed.weight[3])


# ------------------------------------------------------------------------------------------- checkpoint
def test_save_model_checkpoint_round_trips_through_load_location_model(tmp_path):
    from genloc.checkpoint import read_checkpoint, save_model_checkpoint
    from genloc.hub import load_location_model

    torch.manual_seed(3)
    model = LocationModel(LocationModelConfig.preset("tiny", num_bins=32, relative_extents=True))
    path = tmp_path / "sub" / "m.ckpt"
    save_model_checkpoint(model, path, optim={"lr": 0.1})
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.ckpt"]  # no partial file left behind
    ckpt = read_checkpoint(path)
    assert ckpt["hyper_parameters"] == {"model_config": model.cfg.to_dict(), "optim": {"lr": 0.1}}
    loaded = load_location_model(path)
    assert loaded.cfg == model.cfg and not loaded.training
    state, again = model.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    with pytest.raises(TypeError, match="model_config comes from the model"):
        save_model_checkpoint(model, path, model_config={})

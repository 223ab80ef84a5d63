"""Location-model files in the Hugging Face Hub convention (docs/design/placement.md#model-folders), pure PyTorch.

A model folder (or Hub repo) holds exactly `FILES`: ``config.json`` (the `LocationModelConfig`, and
``genloc_version``: the release that wrote it; folders written before it was recorded have none),
``model.safetensors`` (every weight, frozen encoders included) and ``README.md`` (the model card).
`GenLocModel` is the `LocationModel` with `huggingface_hub.PyTorchModelHubMixin`: ``save_pretrained``,
``push_to_hub`` and ``from_pretrained(folder_or_repo_id)``.

The saved config names no weight source (``*_weights: null``): the safetensors file holds the
weights, so loading never fetches a pretrained ViT, CLIP or GPT-2. What a weight source decided
about the architecture is kept in the config instead (`portable_config`).
"""
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import re
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin

from . import __version__
from .checkpoint import CheckpointError, ModelSourceError, model_state_dict, read_checkpoint
from .config import PRESETS, LocationModelConfig
from .location_model import LocationModel
from .pretrained import hub_offline

FILES = ("config.json", "model.safetensors", "README.md")
VERSION_KEY = "genloc_version"
# The model card's install line: genloc is installed from a clone of the repository (no index has it).
INSTALL = "pip install /path/to/GenLoc"
PAPER_URL = "https://arxiv.org/abs/2410.13564"
# The Hub task closest to placement (boxes for an image and a class); the Hub has no placement task.
PIPELINE_TAG = "object-detection"
TAGS = ["object-placement", "object-insertion", "pytorch_model_hub_mixin"]
_POSITIONS = "decoder.transformer.wpe.weight"


class ModelFilesError(ModelSourceError, FileNotFoundError):
    """A model folder or Hub id that cannot be loaded; the message says why and what to do."""


@contextlib.contextmanager
def weights_from_state_dict():
    """Build a model whose weights are loaded next: open_clip's "No pretrained weights loaded ...
    initialized randomly" warning would be false, so it is filtered out (only that message)."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def portable_config(cfg: LocationModelConfig) -> LocationModelConfig:
    """The config that rebuilds ``cfg``'s architecture with no weight source.

    A timm tag picks the model's preprocessing (mean/std), so it moves into the model name
    (``vit_base_patch16_224.augreg2_in21k_ft_in1k``: timm reads the tag without downloading); an
    open_clip tag trained with QuickGELU (``openai``) selects the ``-quickgelu`` model config; GPT-2's
    extra positions are dropped on loading (`model_from_state_dict`). ``compile_decoder`` is a
    machine choice, not part of the model, and is switched off.
    """
    vit, clip_model = cfg.vit, cfg.clip_model
    if cfg.vit_weights and not Path(cfg.vit_weights).expanduser().exists() and "." not in vit:
        vit = f"{vit}.{cfg.vit_weights}"
    if cfg.clip_weights and not Path(cfg.clip_weights).expanduser().exists():
        import open_clip

        quick = bool((open_clip.get_pretrained_cfg(clip_model, cfg.clip_weights) or {}).get("quick_gelu"))
        if quick and not clip_model.endswith("-quickgelu"):
            clip_model = f"{clip_model}-quickgelu"
            if open_clip.get_model_config(clip_model) is None:
                raise ValueError(f"open_clip weights {cfg.clip_model}/{cfg.clip_weights} use QuickGELU but open_clip "
                                 f"has no model config {clip_model!r} to rebuild it without the weights")
    return dataclasses.replace(cfg, vit=vit, vit_weights=None, clip_model=clip_model, clip_weights=None,
                               gpt2_weights=None, compile_decoder=False)


def base_models(cfg: LocationModelConfig) -> list[str]:
    """Hub ids of the pretrained weights ``cfg`` starts from (the card's ``base_model``): the timm ViT,
    the open_clip text tower and GPT-2; weights from local files have no id."""
    def named(weights: Optional[str]) -> bool:
        return bool(weights) and not Path(weights).expanduser().exists()

    ids = []
    if named(cfg.vit_weights):
        import timm

        pretrained = timm.models.get_pretrained_cfg(f"{cfg.vit.split('.')[0]}.{cfg.vit_weights}")
        ids.append(getattr(pretrained, "hf_hub_id", None))
    if named(cfg.clip_weights):
        import open_clip

        ids.append((open_clip.get_pretrained_cfg(cfg.clip_model, cfg.clip_weights) or {}).get("hf_hub"))
    if named(cfg.gpt2_weights):
        ids.append(cfg.gpt2_weights)
    return [i.strip("/") for i in ids if i]


def model_from_state_dict(cfg: LocationModelConfig, state: dict, source: str) -> "GenLocModel":
    """The model of ``cfg`` with the weights of ``state`` (strict), built without fetching any weights.

    A pretrained GPT-2 keeps 1024 position rows; the model uses only the first ``prefix + 5``, so
    the rest are dropped. ``source`` names the file in error messages.
    """
    with weights_from_state_dict():
        model = GenLocModel(portable_config(cfg))
    rows = model.decoder.transformer.wpe.weight.shape[0]
    if _POSITIONS in state and state[_POSITIONS].shape[0] > rows:
        state = {**state, _POSITIONS: state[_POSITIONS][:rows]}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ModelFilesError(f"{source}: the weights do not match its model config: {str(err)[:500]}") from None
    model.base_models = base_models(cfg)  # the portable config no longer names them
    return model.eval()


def load_location_model(path: Union[str, Path]) -> "GenLocModel":
    """Rebuild the LocationModel of a checkpoint (`genloc.checkpoint`), in eval mode, on the CPU; every
    weight comes from the checkpoint (no pretrained weights are fetched, see `model_from_state_dict`)."""
    ckpt = read_checkpoint(path)
    try:
        model = model_from_state_dict(LocationModelConfig.from_dict(ckpt["hyper_parameters"]["model_config"]),
                                      model_state_dict(ckpt), f"checkpoint {path}")
    except ModelFilesError as err:
        raise CheckpointError(str(err)) from None
    model.training_classes = training_classes(path)
    return model


def training_classes(source: Union[str, Path], roots: tuple = ()) -> Optional[list[str]]:
    """The classes of the data a model was trained on, or None when unknown. A model records no class
    list itself; its shard folders do (``{split}.json``'s ``categories``), and a model folder's card
    (its training table) or a checkpoint's run (``config.yaml``'s ``data.data_dir``) names them. Folders
    are read when they are on this machine: relative ones from the working folder, then from each of
    ``roots`` (where training ran, e.g. the repository root)."""
    path = Path(source).expanduser()
    folders = []
    if path.is_dir() and (path / "README.md").is_file():
        for line in (path / "README.md").read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 5 and cells[0].isdigit():  # a row of the card's training table
                folders.append(cells[3].strip("`"))
    elif path.is_file() and path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        import yaml

        try:
            run = yaml.safe_load((path.parent.parent / "config.yaml").read_text())
            data_dir = run["data"]["data_dir"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            data_dir = None
        folders = [str(data_dir)] if data_dir else []
    classes = set()
    for folder in folders:
        folder = next((f for f in (Path(folder), *(Path(r) / folder for r in roots)) if f.is_dir()), None)
        for split in sorted(folder.glob("*.json")) if folder else []:
            try:
                classes.update(json.loads(split.read_text()).get("categories") or [])
            except (OSError, json.JSONDecodeError, AttributeError):
                continue
    return sorted(classes) or None


def is_model_source(source) -> bool:
    """A reference `load_model` can try: an existing file or folder, or an ``owner/name`` Hub id
    (checked before any heavy work, so a typo is one line, not a failed Hub look-up)."""
    if not isinstance(source, (str, Path)) or not str(source).strip():
        return False
    text = str(source)
    return Path(text).expanduser().exists() or (re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None
                                                 and not text.endswith(".ckpt"))


def load_model(source: Union[str, Path], device: str = "cpu") -> "GenLocModel":
    """The one loader of a trained location model: a checkpoint file, a model folder or a Hub id, in
    eval mode. Errors are `ModelSourceError`s (`CheckpointError`, `ModelFilesError`), each naming the source."""
    path = Path(source).expanduser()
    if path.is_file():
        return load_location_model(path).to(device)
    return GenLocModel.from_pretrained(str(source), map_location=device)


def preset_name(cfg: LocationModelConfig) -> str:
    """The preset whose architecture ``cfg`` has (weight sources and training options aside), or "custom"."""
    def shape(c: LocationModelConfig) -> tuple:
        return (c.image_size, c.num_bins, c.vit.split(".")[0], c.vit_kwargs, c.clip_model.removesuffix("-quickgelu"),
                c.gpt2_n_layer, c.gpt2_n_embd, c.gpt2_n_head)

    return next((name for name in PRESETS if shape(LocationModelConfig.preset(name)) == shape(cfg)), "custom")


def model_card(cfg: LocationModelConfig, model_id: str, run: Optional[dict] = None, base_model: Optional[list] = None,
               repo_url: Optional[str] = None) -> str:
    """README.md of a model folder: Hub metadata (library, licence, task, tags, ``base_model``: the Hub ids
    of the pretrained weights it started from, ``datasets``: the training stages' data folders), what
    the model is, how it was trained (``run``, from scripts/export.py: ``stages``, ``metrics``,
    ``metrics_files``, ``checkpoint``), the code repository (``repo_url``, else the installed package's
    ``Repository`` URL), licence, paper and a usage snippet that starts with the install line (`INSTALL`)
    and runs as written with a ``photo.jpg`` beside it."""
    run = run or {}
    stages = run.get("stages") or []
    datasets = sorted({Path(str(st["data"])).name for st in stages if st.get("data") not in (None, "", "?")})
    metadata = ModelCardData(library_name="genloc", license="apache-2.0", pipeline_tag=PIPELINE_TAG, tags=list(TAGS),
                             base_model=list(base_model or []) or None, datasets=datasets or None)
    repo_url = repo_url or repository_url()
    lines = [
        "---", metadata.to_yaml(), "---", "",
        f"# GenLoc location model `{model_id}`", "",
        "A generative location model for spatially aware object insertion, re-implementing *Generative Location "
        f"Modeling for Spatially Aware Object Insertion* (Yun et al., [arXiv 2410.13564]({PAPER_URL})): given a "
        "background image and an object class, it samples plausible bounding boxes for the object (ViT image "
        "tokens + CLIP text embedding as prefix of a GPT-2 decoder emitting x1, y1, x2, y2 as quantised tokens).", "",
        "## Model", "",
        f"- preset: `{preset_name(cfg)}`; image {cfg.image_size} px, {cfg.num_bins} bins per coordinate, "
        f"image encoder `{cfg.vit}`, text encoder `{cfg.clip_model}`, GPT-2 {cfg.gpt2_n_layer} layers x "
        f"{cfg.gpt2_n_embd}, relative extents: {cfg.relative_extents}",
        "- files: `config.json` (the model config), `model.safetensors` (every weight, frozen encoders "
        "included: loading downloads nothing), this card",
    ]
    if base_model:
        lines.append("- started from pretrained " + ", ".join(f"[`{i}`](https://huggingface.co/{i})" for i in base_model))
    if repo_url:
        lines.append(f"- code: {repo_url}")
    if run.get("checkpoint"):
        lines.append(f"- exported from `{run['checkpoint']}`")
    if stages:
        lines += ["", "## Training", "", "| stage | experiment | objective | data | steps |", "|---|---|---|---|---|"]
        for i, st in enumerate(stages, 1):
            lines.append(f"| {i} | `{st.get('experiment', '?')}` | {st.get('objective', '?')} | "
                         f"`{st.get('data', '?')}` | {st.get('steps', '?')} |")
    metrics = run.get("metrics") or {}
    if metrics:
        sources = ", ".join(f"`{f}`" for f in run.get("metrics_files", ["metrics.json"]))
        lines += ["", "## Metrics", "", f"From {sources}: `val/*` are the last stage's validation metrics, `eval/*` "
                  "those of evaluate.py (TPR/FPR at the largest n); `plausible_rate` is the toy-scene oracle's.", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {v:.4f} |" for k, v in sorted(card_metrics(metrics).items())]
    lines += [
        "", "## Usage", "",
        "Install the `genloc` package (not on PyPI: from a clone of the GenLoc repository; `[insert]` adds object "
        "insertion), then run this with a `photo.jpg`:", "",
        "```python",
        f"# {INSTALL}",
        "from genloc import GenLocModel, place, place_many, score",
        "",
        f"model = GenLocModel.from_pretrained({model_id!r})",
        'boxes = place(model, "photo.jpg", "person", n=5, seed=0)  # pixel boxes of photo.jpg + log-probabilities',
        "print(boxes.boxes, boxes.log_probs)",
        'group = place_many(model, "photo.jpg", ["car", "person"], seed=0)  # one box each, no overlap',
        "print(group.boxes)",
        'scored = score(model, "photo.jpg", "person", [[10, 10, 60, 90]])  # any pixel box: its log-probability',
        "print(scored.log_probs, scored.log_densities)",
        "```", "",
        "`place` also takes `region=\"left\"` or pixel `(x1, y1, x2, y2)`, `size=(w, h)` in pixels, "
        "`aspect_ratio=w/h`, `temperature`, `top_k`, `top_p` and `distinct=True` (distinct boxes ranked by "
        "probability); all constraints are masks during decoding.", "",
        "## Licence", "",
        "Code and weights: Apache-2.0. Training data keep their own licences.", "",
    ]
    return "\n".join(lines)


def repository_url() -> Optional[str]:
    """The code repository the installed package names (pyproject's ``[project.urls] Repository``), if any."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        urls = metadata("genloc").get_all("Project-URL") or []
    except PackageNotFoundError:
        return None
    return next((url.strip() for label, _, url in (u.partition(",") for u in urls)
                 if label.strip().lower() == "repository"), None)


def card_metrics(metrics: dict) -> dict:
    """The metrics a model card shows: validation, DPO reward and evaluation numbers (curve points
    ``name@n`` only at the largest ``n``), plus the final training loss."""
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    largest: dict = {}
    for key in numeric:
        name, _, n = key.partition("@")
        if n.isdigit():
            largest[name] = max(largest.get(name, 0), int(n))
    shown = {}
    for key, value in numeric.items():
        name, _, n = key.partition("@")
        if not (key.startswith(("val/", "rewards/", "logps/", "eval/")) or key == "train/loss"):
            continue
        if n.isdigit() and int(n) != largest[name]:
            continue
        shown[key] = value
    return shown


class GenLocModel(LocationModel, PyTorchModelHubMixin, library_name="genloc", license="apache-2.0",
                  paper_url=PAPER_URL, pipeline_tag=PIPELINE_TAG, tags=TAGS[:2]):
    """`LocationModel` that saves and loads as a model folder / Hub repo (see module docstring)."""

    # Set by the loaders (`training_classes`); `genloc.place` and `score` note a class outside them.
    training_classes: Optional[list[str]] = None

    def __init__(self, config: LocationModelConfig):
        super().__init__(config)
        self.base_models = base_models(config)  # the card's base_model; kept across a portable config

    def score(self, image, category, boxes, *, region=None, size=None, aspect_ratio=None):
        """`genloc.placement.score` with this model: log-probability and log-density of each pixel box."""
        from .placement import score

        return score(self, image, category, boxes, region=region, size=size, aspect_ratio=aspect_ratio)

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_model

        config = {**portable_config(self.cfg).to_dict(), VERSION_KEY: __version__}
        (Path(save_directory) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        weights = Path(save_directory) / "model.safetensors"
        save_model(self, str(weights))
        umask = os.umask(0)  # safetensors writes 0600; the folder's other files follow the umask
        os.umask(umask)
        os.chmod(weights, 0o666 & ~umask)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """``model_card_kwargs`` of ``save_pretrained``: ``model_id``, ``run`` and ``repo_url`` (see `model_card`)."""
        return ModelCard(model_card(self.cfg, kwargs.get("model_id", "path/to/model"), kwargs.get("run"),
                                    base_model=self.base_models, repo_url=kwargs.get("repo_url")))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, Path], *, force_download: bool = False,
                        token: Optional[Union[str, bool]] = None, cache_dir: Optional[Union[str, Path]] = None,
                        local_files_only: bool = False, revision: Optional[str] = None, map_location: str = "cpu",
                        strict: bool = True, **hub_options) -> "GenLocModel":
        """Load a model folder or a Hub repo id (downloaded into the hub cache unless offline).

        Takes `PyTorchModelHubMixin.from_pretrained`'s keywords, passed on to `hf_hub_download` for a
        Hub id (a folder needs none); ``hub_options``: any other keyword of the installed
        `hf_hub_download` (e.g. ``proxies`` before huggingface_hub 1.0), else `TypeError`.
        ``strict=True`` (the mixin's default is False): a folder holds
        every weight, so a missing one means a damaged folder. Needs neither Lightning nor the training
        config; raises `ModelFilesError` naming the folder or id and what to do (offline and not
        cached: names ``HF_HUB_OFFLINE``).
        """
        from huggingface_hub import hf_hub_download

        unknown = sorted(set(hub_options) - set(inspect.signature(hf_hub_download).parameters))
        if unknown:
            raise TypeError(f"GenLocModel.from_pretrained() got unexpected keyword argument(s) {unknown}")
        source = str(pretrained_model_name_or_path)
        folder = Path(source).expanduser()
        if folder.is_dir():
            files = {name: folder / name for name in FILES[:2]}
            missing = [name for name, path in files.items() if not path.is_file()]
            if missing:
                raise ModelFilesError(f"{folder} is not a GenLoc model folder: {', '.join(missing)} missing "
                                      "(export one with `python -m scripts.export --checkpoint CKPT --out DIR`)")
        elif folder.exists():
            raise ModelFilesError(f"{source} is a file, not a model folder; pass the folder that holds "
                                  f"{' and '.join(FILES[:2])} (or give a checkpoint where a checkpoint is accepted)")
        else:
            hub = dict(revision=revision, cache_dir=cache_dir, force_download=force_download, token=token, **hub_options)
            files = {name: _download(source, name, local_files_only, **hub) for name in FILES[:2]}
        try:
            data = json.loads(Path(files["config.json"]).read_text())
            data.pop(VERSION_KEY, None)
            cfg = LocationModelConfig.from_dict(data)
        except (ValueError, TypeError, AttributeError) as err:
            raise ModelFilesError(f"{files['config.json']}: not a GenLoc model config ({err})") from None
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        with weights_from_state_dict():
            model = cls(cfg)
        try:
            load_model(model, str(files["model.safetensors"]), strict=strict, device=map_location)
        except SafetensorError as err:  # the file itself: truncated, garbled, not safetensors
            raise ModelFilesError(f"{files['model.safetensors']} is damaged or truncated ({str(err)[:200]}); "
                                  f"export or download the model folder again") from None
        except Exception as err:  # shape mismatch, missing or unexpected keys
            raise ModelFilesError(f"{files['model.safetensors']}: weights do not fit {files['config.json']} "
                                  f"({type(err).__name__}: {str(err)[:300]})") from None
        model._text_cache.clear()
        model.training_classes = training_classes(folder) if folder.is_dir() else None
        if folder.is_dir() and (folder / "README.md").is_file():  # its card keeps what the portable config dropped
            model.base_models = _card_base_models(folder / "README.md")
        return model.eval()


def _card_base_models(card: Path) -> list[str]:
    try:
        found = ModelCard.load(card).data.base_model
    except Exception:  # a card edited into something else: the model loads, the card says less
        return []
    return [found] if isinstance(found, str) else list(found or [])


def _download(repo_id: str, filename: str, local_files_only: bool, cache_dir=None, **hub) -> str:
    """One file of a Hub model repo via the hub cache; offline (or ``local_files_only``) never
    touches the network. ``hub``: the other `hf_hub_download` keywords (revision, force_download, token)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import (EntryNotFoundError, HFValidationError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)

    offline = hub_offline() or local_files_only
    try:
        return hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=offline, **hub)
    except HFValidationError:
        raise ModelFilesError(f"{repo_id!r} is neither a model folder nor a Hub repo id (owner/name)") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        if not offline:
            raise ModelFilesError(f"could not download {filename} of {repo_id!r} from the Hub (no network?); "
                                  f"pass a local model folder instead") from None
        raise ModelFilesError(
            f"model {repo_id!r} is not a local folder and its {filename} is not in the hub cache "
            f"({cache_dir or HF_HUB_CACHE}), and HF_HUB_OFFLINE=1 (or local_files_only) forbids downloading it: "
            f"run once with network access and without HF_HUB_OFFLINE (or `hf download {repo_id}`), "
            "or pass a model folder") from None
    except RepositoryNotFoundError:
        raise ModelFilesError(f"Hub repo {repo_id!r} not found (or private: log in with `hf auth login`)") from None
    except EntryNotFoundError:
        raise ModelFilesError(f"Hub repo {repo_id!r} has no {filename}: not a GenLoc model repo") from None

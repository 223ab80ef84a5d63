"""PowerPaint v1's object-insertion task on Stable Diffusion inpainting (the paper's inserter).

PowerPaint (Zhuang et al., 2024) fine-tunes SD 1.5 inpainting together with three learned task
prompts, each a word of 10 embedding vectors: `P_obj` (text-guided object inpainting), `P_ctxt`
(context-aware fill / removal) and `P_shape` (shape-guided). A request is two prompts, A and B, whose
text embeddings are mixed `tradeoff * A + (1 - tradeoff) * B` (the same for the negative prompts);
object insertion uses `P_obj` in both, so the mix is plain `P_obj` conditioning. diffusers has no
PowerPaint pipeline: this module rebuilds the prompt handling on top of diffusers'
`StableDiffusionInpaintPipeline` by passing the mixed embeddings as `prompt_embeds`.

Folder: a Stable Diffusion inpainting pipeline folder whose `unet/` and `text_encoder/` are
PowerPaint v1's (copy the two sub-folders of the JunhaoZhuang/PowerPaint-v1 release over a copy of
runwayml/stable-diffusion-inpainting). The release's text encoder has 30 more token rows than the
base tokenizer: `P_obj, P_obj_1..P_obj_9, P_ctxt, ..., P_shape_9` in that order (the order PowerPaint
registers them in); they are added to the tokenizer at load time unless the tokenizer has them already.
"""
from __future__ import annotations

import torch

from genloc.inpainters.base import (BackendFolderError, Inpainter, default_dtype, open_pipeline,
                                    require_pipeline_folder, to_pil)

TASK_WORDS = ("P_obj", "P_ctxt", "P_shape")  # order of the release's extra text-encoder rows
VECTORS_PER_WORD = 10
NEGATIVE = "worst quality, low quality, normal quality, bad quality, blurry"
LAYOUT = ("a Stable Diffusion inpainting pipeline folder (model_index.json, vae/, tokenizer/, scheduler/) whose unet/ "
          "and text_encoder/ come from the PowerPaint v1 release (JunhaoZhuang/PowerPaint-v1): the text encoder has "
          f"{len(TASK_WORDS) * VECTORS_PER_WORD} token rows more than the tokenizer (task words {', '.join(TASK_WORDS)})")


def word_tokens(word: str) -> list[str]:
    """The tokenizer entries of one multi-vector task word (diffusers' textual-inversion naming)."""
    return [word] + [f"{word}_{i}" for i in range(1, VECTORS_PER_WORD)]


def expand(text: str) -> str:
    """Replace each task word by its vector tokens: "P_obj a cat" -> "P_obj P_obj_1 ... P_obj_9 a cat"."""
    return " ".join(" ".join(word_tokens(w)) if w in TASK_WORDS else w for w in text.split(" "))


def add_task_tokens(tokenizer, text_encoder, folder) -> None:
    """Register the task words in the tokenizer (if absent) and check they index the encoder's extra rows."""
    names = [t for w in TASK_WORDS for t in word_tokens(w)]
    rows = text_encoder.get_input_embeddings().weight.shape[0]
    if tokenizer.convert_tokens_to_ids(names[0]) in (None, tokenizer.unk_token_id):
        if rows != len(tokenizer) + len(names):
            raise BackendFolderError(
                f"powerpaint back-end: {folder}/text_encoder has {rows} token rows but the tokenizer has {len(tokenizer)} "
                f"and no task words: not PowerPaint v1's text encoder; expected {LAYOUT}")
        tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(ids[0], ids[0] + len(names))) or ids[-1] >= rows:
        raise BackendFolderError(f"powerpaint back-end: the task words of {folder}/tokenizer (ids {ids[0]}..{ids[-1]}) do not "
                                 f"match the text encoder's {rows} rows; expected {LAYOUT}")


class PowerPaintInpainter(Inpainter):
    """PowerPaint v1 text-guided object inpainting (`P_obj`), prompt "P_obj {prompt}".

    Args (besides `Inpainter`'s): tradeoff: weight of prompt A in the A/B embedding mix (PowerPaint's
    "fitting degree"); `prompt_b` / `negative_b`: prompt B's templates (default: the same as A, as in
    PowerPaint's object-insertion task)."""

    name = "powerpaint"
    TASK = "P_obj {}"

    @classmethod
    def load(cls, folder, *, device="cpu", dtype=None, **options):
        from diffusers import StableDiffusionInpaintPipeline

        folder = require_pipeline_folder(folder, cls.name, LAYOUT, parts=("unet", "text_encoder", "tokenizer"))
        pipe = open_pipeline(StableDiffusionInpaintPipeline, folder, dtype or default_dtype(device))
        if pipe.unet.config.in_channels != 9:
            raise BackendFolderError(f"powerpaint back-end: {folder}/unet has {pipe.unet.config.in_channels} input "
                                     f"channels, PowerPaint v1's has 9; expected {LAYOUT}")
        add_task_tokens(pipe.tokenizer, pipe.text_encoder, folder)
        return cls(pipe.to(device), **options)

    def __init__(self, pipe, *, tradeoff: float = 1.0, prompt_b: str | None = None, negative_b: str | None = None,
                 **options):
        super().__init__(pipe, **options)
        self.tradeoff = tradeoff
        self.prompt_b = prompt_b or self.TASK
        self.negative_b = negative_b or NEGATIVE

    @torch.no_grad()
    def encode(self, text: str) -> torch.Tensor:
        """CLIP text-encoder hidden states `[1, 77, d]` of `text` with its task words expanded."""
        tok = self.pipe.tokenizer
        ids = tok(expand(text), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return self.pipe.text_encoder(ids.to(self.pipe.text_encoder.device))[0]

    def mixed(self, text_a: str, text_b: str) -> torch.Tensor:
        a = self.encode(text_a)
        return a if text_a == text_b else self.tradeoff * a + (1.0 - self.tradeoff) * self.encode(text_b)

    def generate(self, canvas, mask, box_norm, prompt, category, generator):
        w, h = canvas.size
        prompt_embeds = self.mixed(self.TASK.format(prompt), self.prompt_b.format(prompt))
        negative_embeds = self.mixed(NEGATIVE, self.negative_b)
        out = self.pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, image=canvas,
                        mask_image=mask, height=h, width=w, strength=1.0, num_inference_steps=self.steps,
                        guidance_scale=self.guidance_scale, generator=generator, output_type="np")
        return to_pil(out.images[0])

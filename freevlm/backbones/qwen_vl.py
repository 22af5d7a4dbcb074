"""The Qwen-VL line (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`,
`Qwen3VLForConditionalGeneration`): a vision tower over flattened patches at any resolution in front of a
Qwen2 / Qwen3-like decoder (`rotary.py` runs its layers).

What differs from LLaVA's decoder, and what the engine must do itself:

- the image path takes the processor's `pixel_values` (one row per patch, not [B, C, H, W]) with `image_grid_thw`
  (each image's (t, h, w) patch grid; 2x2 patches merge into one image token) and `mm_token_type_ids` (1 at image
  tokens): Hugging Face's `get_image_features` and placeholder scatter, as its `generate` runs them;
- multimodal rotary positions: every slot has three positions (time, height, width) whose angles fill separate
  parts of the rotary dimensions (`mrope_section`). Image tokens get their place in the image's grid, text tokens
  the same position three times. The prompt's come from the model's own `get_rope_index` (padding slots get 0);
  each new token gets the last prompt slot's positions plus its distance from it, per stream: what Hugging Face's
  `generate` feeds the model (5.17 and 5.24: its running `position_ids`, one further per step), not the
  `cache_position + rope_deltas` its forward falls back to without positions, which differs on left-padded rows
  (tests/test_families.py's padded batches tell them apart). They are kept as
  `[B, slots, 3]` so that the rotary code's slicing by rows and slots holds, and turned to Hugging Face's
  `[3, n, q]` when cos/sin are made;
- Qwen3-VL's DeepStack: the tower's intermediate features (one set per `deepstack_visual_indexes`) are added to
  the output of the LM's first layers at the prompt's image slots (`run_layer`, prefill and training passes; a new
  token is never an image slot).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Context, check_token_types, prompt_key_mask
from .llava import LlavaLayout
from .rotary import RotaryDecoder

PRETTY = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}


class QwenVLBackbone(RotaryDecoder):
    """A Qwen2-VL, Qwen2.5-VL or Qwen3-VL; its requests take the processor's `image_grid_thw` and
    `mm_token_type_ids` with its `pixel_values` (images only: video inputs are refused by name)."""

    input_names = ("image_grid_thw", "mm_token_type_ids")
    pixel_layout = "patches"

    def __init__(self, model: nn.Module):
        super().__init__(model, lm=model)  # the whole model owns the head and the generation config
        self.name = PRETTY.get(model.config.model_type, type(model).__name__)
        self.config = LlavaLayout(model.config, None, image_token_index=model.config.image_token_id)
        self.vision = model.config.vision_config
        # Qwen3-VL: LM layer i gets the i-th DeepStack feature set added at image slots
        levels = len(getattr(self.vision, "deepstack_visual_indexes", None) or ())
        self.deepstack = {layer: i for i, layer in enumerate(self.layers[:levels])}

    @property
    def graph_safe(self) -> bool:
        """As the other rotary LMs (positions through the window's slot tensor), but for Qwen3-VL: DeepStack's image
        slots are found from the window start on the host (`run_layer`)."""
        return not self.deepstack and super().graph_safe

    def stage1_parts(self) -> dict[str, list[nn.Module]]:
        """The tower, its patch mergers (what maps its features into the LM: the projection; Qwen3-VL's DeepStack
        ones too) and the LM."""
        visual, mergers = self.model.model.visual, ("merger", "deepstack_merger_list")
        return {
            "vision": [child for name, child in visual.named_children() if name not in mergers],
            "projection": [getattr(visual, name) for name in mergers if hasattr(visual, name)],
            "lm": [self.model.model.language_model, self.model.lm_head],
        }

    # --- the inputs ----------------------------------------------------------------------------------------------
    def tokens_per_image(self, image_grid_thw: torch.Tensor) -> list[int]:
        """Image tokens each image takes in the prompt: its patches over the 2x2 (`spatial_merge_size`) merge."""
        return (image_grid_thw.prod(-1) // self.vision.spatial_merge_size**2).tolist()

    def check_inputs(self, pixel_values, input_ids, attention_mask, inputs: dict) -> None:
        """Patches, grids, image tokens and token types must agree (Hugging Face would fail deep inside, or place
        features and positions wrongly); a `ValueError` naming the input otherwise."""
        grid, types = inputs.get("image_grid_thw"), inputs.get("mm_token_type_ids")
        if input_ids is None:
            raise ValueError(f"{self.name} needs input_ids from its processor: the image tokens it expands per image")
        if grid is None:
            raise ValueError(
                f"{self.name} needs image_grid_thw (each image's (t, h, w) patch grid, from its processor): its "
                "vision tower and its rotary positions read them"
            )
        if not isinstance(grid, torch.Tensor) or grid.dim() != 2 or grid.shape[1] != 3 or grid.is_floating_point():
            shape = tuple(grid.shape) if isinstance(grid, torch.Tensor) else type(grid).__name__
            raise ValueError(f"image_grid_thw must be an integer [images, 3] tensor of (t, h, w), got {shape}")
        merge = self.vision.spatial_merge_size
        if bool((grid <= 0).any()) or bool((grid[:, 1:] % merge).any()):
            raise ValueError(
                f"image_grid_thw rows must be positive with h and w multiples of {merge} (the patch merge), got "
                f"{grid.tolist()[:4]}"
            )
        patch = self.vision.in_channels * self.vision.temporal_patch_size * self.vision.patch_size**2
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 2 or pixel_values.shape[1] != patch:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(
                f"{self.name}'s pixel_values are its processor's flattened patches, [patches, {patch}], got {shape}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be floating point (the image processor's output), got {pixel_values.dtype}"
            )
        patches = int(grid.prod(-1).sum())
        if pixel_values.shape[0] != patches:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw {grid.tolist()[:4]} makes "
                f"{patches}: pass the processor's pixel_values with its image_grid_thw"
            )
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        image = (input_ids == self.config.image_token_index) & real
        expected = sum(self.tokens_per_image(grid))
        if int(image.sum()) != expected:
            raise ValueError(
                f"input_ids hold {int(image.sum())} image token(s) (id {self.config.image_token_index}) but "
                f"image_grid_thw's {len(grid)} image(s) make {expected}: build prompts with the model's processor"
            )
        self.images_per_row(input_ids, grid)  # each row holds whole images
        if types is None:
            raise ValueError(
                f"{self.name} needs mm_token_type_ids (1 at image tokens, from its processor): its rotary positions "
                "are computed from them (get_rope_index)"
            )
        check_token_types("mm_token_type_ids", types, input_ids, attention_mask, self.config.image_token_index)

    def images_per_row(
        self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None, **inputs
    ) -> list[int]:
        """How many images (of `image_grid_thw`, in order) each prompt row holds, from its image-token count."""
        if image_grid_thw is None:
            raise ValueError(f"{self.name} needs image_grid_thw to tell which images a prompt row holds")
        sizes = iter(self.tokens_per_image(image_grid_thw))
        counts = []
        for b, tokens in enumerate((input_ids == self.config.image_token_index).sum(dim=1).tolist()):
            images = 0
            while tokens > 0:
                tokens -= next(sizes, tokens + 1)
                images += 1
            if tokens < 0:
                raise ValueError(
                    f"prompt row {b}'s image tokens do not cover whole images of image_grid_thw: build prompts "
                    "with the model's processor"
                )
            counts.append(images)
        return counts

    def beam_inputs(self, pixel_values, input_ids, inputs: dict, k: int) -> tuple[torch.Tensor, dict]:
        """Each row's images (their patches and grids) once per beam, as the model's `generate` repeats them."""
        grid = inputs["image_grid_thw"]
        per_row = self.images_per_row(input_ids, grid)
        patches = torch.split(pixel_values, grid.prod(-1).tolist())
        first = 0
        pixels, grids = [], []
        for n in per_row:
            pixels += [torch.cat(patches[first : first + n] or [pixel_values[:0]])] * k
            grids += [grid[first : first + n]] * k
            first += n
        expanded = {name: value.repeat_interleave(k, dim=0) for name, value in inputs.items()}
        expanded["image_grid_thw"] = torch.cat(grids)
        return torch.cat(pixels), expanded

    # --- the prompt ------------------------------------------------------------------------------------------------
    def start(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        decoder_input_ids: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> Context:
        inputs = {"image_grid_thw": image_grid_thw, "mm_token_type_ids": mm_token_type_ids}
        self.check_inputs(pixel_values, input_ids, attention_mask, inputs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        model = self.model.model
        output = model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        embeds = self.text.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_index
        features = torch.cat(output.pooler_output).to(embeds.device, embeds.dtype)
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), features)
        key_mask = prompt_key_mask(attention_mask.to(embeds.device), max_new_tokens)
        prompt, _ = model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )  # [3, B, L0]
        steps = torch.arange(1, max_new_tokens + 1, device=prompt.device)
        new = prompt[:, :, -1:] + steps  # the last prompt slot's positions, one further per new token
        extra = {"positions": torch.cat([prompt, new], dim=2).permute(1, 2, 0)}  # [B, slots, 3]
        if self.deepstack:
            levels = getattr(output, "deepstack_features", None) or []
            # 5.17 gives each level for all images at once, later releases per image
            levels = [torch.cat(list(f)) if isinstance(f, (list, tuple)) else f for f in levels]
            extra["deepstack"] = [self._scatter(is_image, f.to(embeds.dtype)) for f in levels]
            extra["image_slots"] = is_image
        return Context(input_ids, embeds, key_mask, extra)

    @staticmethod
    def _scatter(is_image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Features in order at the image slots of a `[B, L0, H]` tensor, zero elsewhere."""
        dense = features.new_zeros(*is_image.shape, features.shape[-1])
        return dense.masked_scatter(is_image.unsqueeze(-1), features)

    # --- rows at their own slots (continuous batching) ---------------------------------------------------------------
    def prompt_in_rows(self, ctx):
        """No: a prompt's positions follow its images' grids, not its slots (and DeepStack adds to image slots)."""
        return False

    def rows_context(self, rows, slots, prompt_slots):
        """Per row, each position stream's offset from the slot (`rope_deltas`): a window of rows covers the last
        prompt slot and new tokens, whose positions are the last prompt slot's plus their distance from it."""
        ctx = super().rows_context(rows, slots, prompt_slots)
        ctx.extra["rope_deltas"] = torch.zeros(rows, 3, dtype=torch.long, device=self.device)
        return ctx

    def join_row(self, rows_ctx, row, ctx):
        last = ctx.prompt_ids.shape[1] - 1
        if self.deepstack and bool(ctx.extra["image_slots"][0, last]):
            raise ValueError(
                f"{self.name}'s prompt ends with an image token: its DeepStack features would reach that slot in a "
                "window of rows; end the prompt with text (the processor closes images with <|vision_end|>)"
            )
        rows_ctx.extra["rope_deltas"][row] = ctx.extra["positions"][0, last] - last

    def window_context(self, rows_ctx, positions, rows=None):
        ctx = super().window_context(rows_ctx, positions, rows)
        deltas = rows_ctx.extra["rope_deltas"]
        deltas = deltas[: positions.shape[0]] if rows is None else deltas[rows]
        ctx.extra["positions"] = positions[..., None] + deltas[:, None, :]  # [n, q, 3]
        return ctx

    # --- layers ----------------------------------------------------------------------------------------------------
    def rotary_embedding(self, hidden, positions, layer):
        return self.text.rotary_emb(hidden, positions.permute(2, 0, 1))

    def run_layer(self, layer, hidden, ctx, cache, mask, rows):
        out = super().run_layer(layer, hidden, ctx, cache, mask, rows)
        level = self.deepstack.get(layer)
        if level is None or "deepstack" not in ctx.extra:  # a window of rows (`window_context`): no image slot
            return out
        start = 0 if cache is None else cache.start
        image = ctx.extra["image_slots"]
        end = min(start + hidden.shape[1], image.shape[1])
        if start >= end:  # a window of new tokens only: no image slot
            return out
        added = ctx.extra["deepstack"][level]
        if rows is not None:
            image, added = image[rows], added[rows]
        image, added = image[:, start:end, None], added[:, start:end]
        head = torch.where(image, out[:, : end - start] + added, out[:, : end - start])
        return torch.cat([head, out[:, end - start :]], dim=1)

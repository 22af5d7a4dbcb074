"""`validate_generate_inputs` (issue 14): what `EarlyExitVLM.generate` is given is checked before any layer runs,
with a ValueError naming the argument, and one warning for legal but suspicious inputs. Also the training
configs' own checks for API users (no argparse in between)."""

import math
import warnings

import pytest
import torch

from freevlm.backbones import load_backbone
from freevlm.inputs import InputWarning, validate_generate_inputs
from freevlm.tiny import tiny_inputs


@pytest.fixture
def backbone(model):
    return load_backbone(model)


def check(backbone, pv, ids, mask, max_new_tokens=5):
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)  # a warning here would hide a missing error
        validate_generate_inputs(backbone, pv, ids, mask, max_new_tokens)


def test_good_inputs_pass_silently(backbone, model):
    pv, ids, mask = tiny_inputs(model, batch=2, pad=True)
    check(backbone, pv, ids, mask)
    check(backbone, pv, ids, None)
    check(backbone, pv, None, None)
    pv, ids, _ = tiny_inputs(model, batch=2)  # unpadded, so that no row keeps an image token after the cut
    check(backbone, pv, ids[:, model.config.num_query_tokens :], None)  # image tokens added by the engine


@pytest.mark.parametrize("channels", [1, 4])
def test_image_channels(backbone, model, channels):
    pv, ids, mask = tiny_inputs(model)
    with pytest.raises(ValueError, match=f"pixel_values has {channels} channel\\(s\\), the vision encoder takes 3"):
        check(backbone, pv[:, :1].expand(-1, channels, -1, -1), ids, mask)


def test_image_size_and_shape(backbone, model):
    pv, ids, mask = tiny_inputs(model)
    with pytest.raises(ValueError, match="pixel_values are 48x48 but the vision encoder takes 32x32"):
        check(backbone, torch.randn(1, 3, 48, 48), ids, mask)
    with pytest.raises(ValueError, match="pixel_values must be a \\[batch, channels, height, width\\] tensor"):
        check(backbone, pv[0], ids, mask)
    with pytest.raises(ValueError, match="pixel_values must be floating point"):
        check(backbone, pv.long(), ids, mask)


def test_input_ids_out_of_vocabulary_negative_or_float(backbone, model):
    pv, ids, mask = tiny_inputs(model)
    vocab = model.get_input_embeddings().num_embeddings
    for bad_id in (vocab, -1):
        bad = ids.clone()
        bad[0, -1] = bad_id
        with pytest.raises(
            ValueError, match=f"input_ids holds token id {bad_id}, outside the vocabulary \\[0, {vocab}\\)"
        ):
            check(backbone, pv, bad, mask)
    with pytest.raises(ValueError, match="input_ids must hold integer token ids \\(torch.long\\), got torch.float32"):
        check(backbone, pv, ids.float(), mask)
    with pytest.raises(ValueError, match="input_ids has 1 rows but pixel_values has 2 images"):
        check(backbone, pv.expand(2, -1, -1, -1), ids, None)


def test_attention_mask_shape_values_and_missing_ids(backbone, model):
    pv, ids, mask = tiny_inputs(model)
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids \\(1, 7\\), got \\(1, 6\\)"):
        check(backbone, pv, ids, mask[:, 1:])
    with pytest.raises(ValueError, match="attention_mask must hold only 0 \\(padding\\) and 1 \\(token\\)"):
        check(backbone, pv, ids, mask * 2)
    with pytest.raises(ValueError, match="attention_mask was given without input_ids"):
        check(backbone, pv, None, mask)


def test_prompt_plus_new_tokens_beyond_the_positions(backbone, model, family):
    pv, ids, mask = tiny_inputs(model)
    if family == "t5":  # relative positions: no limit to check
        check(backbone, pv, ids, mask, max_new_tokens=1000)
        return
    limit = model.config.text_config.max_position_embeddings
    check(backbone, pv, ids, mask, max_new_tokens=limit - ids.shape[1])  # exactly fits
    with pytest.raises(
        ValueError,
        match=f"prompt \\(7 tokens.*max_new_tokens={limit}.*{limit} positions: "
        f"max_new_tokens can be at most {limit - 7}",
    ):
        check(backbone, pv, ids, mask, max_new_tokens=limit)


def test_zero_mask_rows_and_nan_pixels_warn_once(backbone, model):
    pv, ids, mask = tiny_inputs(model, batch=3)
    mask[1] = 0
    with pytest.warns(InputWarning, match="attention_mask rows \\[1\\] are all zero") as record:
        validate_generate_inputs(backbone, pv, ids, mask, 5)
    assert len(record) == 1
    pv[2, 0, 0, 0] = math.nan
    pv[0, 1, 3, 3] = math.inf
    with pytest.warns(InputWarning, match="pixel_values of image\\(s\\) \\[0, 2\\] hold NaN or inf") as record:
        validate_generate_inputs(backbone, pv, ids, None, 5)
    assert len(record) == 1


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr", math.inf, "lr must be a finite number"),
        ("lr", 0.0, "lr must be > 0"),
        ("epochs", 0, "epochs must be >= 1"),
        ("log_every", 0, "log_every must be >= 1"),
        ("batch_size", 0, "batch_size must be >= 1"),
        ("max_steps", 0, "max_steps must be >= 1"),
        ("checkpoint_every", -1, "checkpoint_every must be >= 1"),
        ("adv_weight", math.nan, "adv_weight must be a finite number"),
        ("temperature", math.inf, "temperature must be a finite number"),
    ],
)
def test_training_configs_refuse_nonsense_numbers(field, value, message):
    from freevlm.training import ExitTrainConfig

    with pytest.raises(ValueError, match=message):
        ExitTrainConfig(exit_layers=(1,), **{field: value}).validate()


def test_exits_weights_from_another_run_are_refused(tmp_path, opt_model):
    """exits_config.json records a digest of the weights saved beside it: another run's weights file of the same
    shapes is refused (through the loader the CLI uses, and through the API)."""
    import shutil

    from freevlm import EarlyExitVLM, ExitConfig
    from freevlm.loading import load_exits
    from freevlm.model import CheckpointMismatchError

    mine, other = tmp_path / "mine", tmp_path / "other"
    for folder, init in ((mine, "copy_last"), (other, "fresh")):
        EarlyExitVLM(opt_model, ExitConfig([2], init=init)).save_exits(folder)
    load_exits(opt_model, mine)  # its own weights load
    shutil.copy(other / "exits.safetensors", mine / "exits.safetensors")  # same shapes, another run's weights
    for load in (load_exits, EarlyExitVLM.from_pretrained):
        with pytest.raises(CheckpointMismatchError, match="is not the weights file saved with its exits_config.json"):
            load(opt_model, mine)


def test_a_thumbnail_far_below_the_processor_size_warns_once():
    from PIL import Image

    from freevlm.inputs import InputWarning
    from freevlm.loading import warn_small_images

    class Processor:
        size = {"height": 224, "width": 224}  # noqa: RUF012  (a processor's attribute)

    with pytest.warns(InputWarning, match=r"image\(s\) \[1\] are under a quarter of the 224 px"):
        warn_small_images([Image.new("RGB", (200, 180)), Image.new("RGB", (40, 40))], Processor())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_small_images([Image.new("RGB", (200, 180))], Processor())


def test_right_padding_before_a_decoder_only_lm_and_partial_image_tokens(backbone, model, family):
    """Found by tests/test_fuzz_api.py: a right-padded prompt decoded silently after its padding (decoder-only), and
    a BLIP-2 prompt holding some image tokens but not `num_query_tokens` of them failed deep inside (or, across
    rows, took misplaced features silently)."""
    pv, ids, mask = tiny_inputs(model, batch=2)
    right = mask.clone()
    right[0, -1] = 0
    if family == "t5":  # the encoder reads the whole prompt at once: padding on either side is fine
        check(backbone, pv, ids, right)
    else:
        with pytest.raises(ValueError, match=r"attention_mask rows \[0\] are right-padded"):
            check(backbone, pv, ids, right)
    partial = ids.clone()
    partial[1, 0] = 5
    with pytest.raises(ValueError, match=r"prompt row 1 holds 3 image token\(s\) \(id 98\) in input_ids"):
        check(backbone, pv, partial, None)

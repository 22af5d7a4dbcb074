import pytest
import torch

from freevlm.decoding.policies import ExitPolicy
from freevlm.tiny import tiny_blip2

torch.set_num_threads(2)


class RandomPolicy(ExitPolicy):
    """Leaves at each live exit with probability `p`, row by row, from a seeded generator (mixed schedules)."""

    def __init__(self, p: float = 0.4, seed: int = 0):
        self.p = p
        self.gen = torch.Generator().manual_seed(seed)

    def live_exits(self, exit_layers):
        return list(exit_layers)

    def decide(self, layer, logits, step, rows, hidden=None):
        return torch.rand(len(rows), generator=self.gen) < self.p


class TokenHashPolicy(ExitPolicy):
    """Leaves when two logits picked by (layer, step) compare one way: depends on the row alone, yet well mixed."""

    def live_exits(self, exit_layers):
        return list(exit_layers)

    def needs_logits(self, layer):
        return True

    def decide(self, layer, logits, step, rows, hidden=None):
        return logits[:, 10 + layer] > logits[:, 20 + step % 7]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far more so when other jobs share the cores (training test
    modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def opt_model():
    return tiny_blip2("opt", seed=0)


@pytest.fixture(scope="session")
def t5_model():
    return tiny_blip2("t5", seed=0)


@pytest.fixture(params=["opt", "t5"])
def family(request):
    return request.param


@pytest.fixture
def model(family, opt_model, t5_model):
    return opt_model if family == "opt" else t5_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny BLIP-2 OPT folder (model, tokenizer, image processor) and exits at 1 and 2 saved beside it, as the
    commands read them. The exits are built on the reloaded backbone: the fingerprint of an in-memory model differs
    from its reloaded copy (config `dtype` None vs "float32")."""
    from tiny_processor import tiny_bundle

    from freevlm import EarlyExitVLM, ExitConfig
    from freevlm.loading import load_vlm

    root = tmp_path_factory.mktemp("ckpt")
    model = tiny_blip2("opt", seed=2, num_layers=4)
    bundle = tiny_bundle(model)
    model.save_pretrained(root / "backbone")
    bundle.tokenizer.save_pretrained(root / "backbone")
    bundle.image_processor.save_pretrained(root / "backbone")
    reloaded = load_vlm(root / "backbone").model
    EarlyExitVLM(reloaded, ExitConfig([1, 2], init="fresh")).save_exits(root / "exits")
    return root

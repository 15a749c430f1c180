"""The shipped dataset recipes load through the schema and carry arcface_torch's published settings."""

from pathlib import Path

import pytest

from hfs.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# name: (arch, head, margin, weight decay, classes of the dataset)
RECIPES = {
    "ms1mv3_r50": ("iresnet50", "arcface", 0.5, 5e-4, 93_431),
    "glint360k_r100": ("iresnet100", "cosface", 0.4, 1e-4, 360_232),
    "webface42m_r100": ("iresnet100", "cosface", 0.4, 5e-4, 2_059_906),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_loads_with_arcface_torch_hyper_parameters(name):
    path = CONFIGS / f"{name}.yaml"
    cfg = load_config(path)
    arch, head, margin, decay, classes = RECIPES[name]
    assert path.read_text().startswith(f"# hfs train-dist --config configs/{name}.yaml\n")
    assert (cfg.model.arch, cfg.head.type, cfg.head.margin, cfg.head.scale) == (arch, head, margin, 64.0)
    o = cfg.optim
    assert (o.name, o.lr, o.momentum, o.weight_decay) == ("sgd", 0.1, 0.9, pytest.approx(decay))
    assert (o.schedule, o.power, o.warmup_steps, o.clip_grad_norm) == ("poly", 1.0, 0, 5.0)
    assert cfg.train.batch_size * cfg.dist.nproc == 1024 and cfg.train.epochs == 20 and cfg.train.amp == "fp16"
    assert (cfg.data.source, cfg.data.image_size, cfg.model.embedding_size) == ("rec", 112, 512)
    assert cfg.fc.mode == "sampled" and cfg.sampler.type == "exact"
    assert cfg.fc.sample_num == round(0.01 * classes)  # the provisional 1% of C
    assert all(Path(b).parent == Path(cfg.data.root) for b in cfg.eval.bins)


def test_training_guide_names_every_recipe():
    guide = (CONFIGS.parent / "docs" / "training.md").read_text()
    for name in RECIPES:
        assert f"configs/{name}.yaml" in guide, f"docs/training.md's recipes table lacks configs/{name}.yaml"

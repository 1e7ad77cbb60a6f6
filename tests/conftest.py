"""Shared fixtures: the bundled sample, the real benchmark folder (skipped when absent), the tiny backbone,
and Hydra composition of the project's configs."""

from __future__ import annotations

import os
from pathlib import Path

# Offline before anything imports transformers / huggingface_hub: a hub lookup would hang, not fail.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "data" / "vqa_rad_sample"
CONF_DIR = REPO_ROOT / "conf"
MEDVQA_DIR = Path(os.environ.get("MEDVQA_ROOT", REPO_ROOT.parent / "shared" / "data" / "medvqa"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The chat template that llava-hf ships with LLaVA-1.5 (chat_template.json): no end-of-turn marker after
# assistant turns, and "ASSISTANT:" as the generation prompt. It lives with the tiny LLaVA-1.5 builder.
from families.builders.llava15 import LLAVA15_TEMPLATE  # noqa: E402,F401


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def medvqa_dir() -> Path:
    if not (MEDVQA_DIR / "vqa_rad" / "testset.json").is_file():
        pytest.skip(f"real benchmark data not found at {MEDVQA_DIR} (set MEDVQA_ROOT to a folder with "
                    "vqa_rad/ and slake/ to run this test)")
    return MEDVQA_DIR


def tiny_spec(**overrides):
    from stllava_med.tiny import TinySpec

    return TinySpec(corpus=[str(SAMPLE_DIR / "trainset.json"), str(SAMPLE_DIR / "testset.json")], **overrides)


@pytest.fixture(scope="session")
def tiny_backbone_path() -> Path:
    """The project's default tiny backbone (the same one `backbone=tiny` builds), cached in data/backbones."""
    from stllava_med.tiny import ensure_tiny_backbone

    return ensure_tiny_backbone(REPO_ROOT / "data" / "backbones" / "tiny", tiny_spec())


@pytest.fixture()
def tiny_backbone(tiny_backbone_path):
    """A freshly loaded tiny backbone (function scope: tests may train it)."""
    from stllava_med.backbone import load_backbone

    return load_backbone({"name_or_path": str(tiny_backbone_path), "name": "tiny"})


def compose(config_name: str, overrides: list[str] | None = None):
    """Compose a project config exactly as `python -m stllava_med.<stage>` would (without running it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import stllava_med.utils.config  # noqa: F401  (registers resolvers)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=False)


@pytest.fixture()
def compose_config():
    return compose


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (restored afterwards): tiny models gain nothing from a second thread, and
    on a busy 2-core runner two OpenMP threads spinning against other work made runs several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Tiers. `make test` runs everything; `make test-fast` (-m "not slow") leaves out the modules below — whole
# training runs, subprocess sweeps and launchers, SIGKILL / signal resumes, DDP, the wheel build and the family
# stage runs — besides tests marked @pytest.mark.slow one by one.
SLOW_MODULES = {
    "test_cluster_sweeps", "test_console", "test_convert_checkpoint", "test_dpo_train", "test_family_stages", "test_grad_accumulation",
    "test_judge_disk_full", "test_judge_exit", "test_judge_shared_store", "test_pipeline", "test_run_identity", "test_selftrain_generate", "test_selftrain_judge", "test_sharding", "test_sft_qlora",
    "test_requeue", "test_sft_resume", "test_sft_train", "test_sft_vision_lora", "test_signals", "test_wheel_install",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)

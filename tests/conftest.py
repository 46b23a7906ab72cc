
import pytest
from assets import build_demo_assets  # noqa: E402


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """Tiny demo data (train/eval shards, tokenizer) and tiny teacher/student checkpoints, built once."""
    return build_demo_assets(str(tmp_path_factory.mktemp("demo_assets")))

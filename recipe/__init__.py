"""Switch-KD: visual-switch knowledge distillation for vision-language models, on DeepSpeed."""
import os

# The checkout the package is installed from (pip install -e .): ds_configs/ and recipe/configs/ live there.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

"""Switch-KD: visual-switch knowledge distillation for vision-language models, on DeepSpeed."""

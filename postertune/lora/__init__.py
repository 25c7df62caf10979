"""Extract LoRAs from the fine-tuned U-Net and merge LoRA files into a U-Net."""

"""Stage lora: LoRAs extracted from the fine-tuned U-Net, and LoRA files merged into a U-Net."""

from postertune.cli import run_stage
from postertune.lora.params import LoraParams
from postertune.lora.run import run

if __name__ == "__main__":
    run_stage("lora", LoraParams, run)

"""The training core both trainers share (loop.py: Fabric, precision, accumulation, resume; state.py: the
resume format). The AnyDressing trainer is in anydressing_trainer/, the garment-LoRA trainer in garment_lora/."""

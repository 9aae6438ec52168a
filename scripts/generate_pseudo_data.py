"""Pseudo samples for generative replay (docs/data.md): a thin front for `python -m sapt pseudo_data`.

    python scripts/generate_pseudo_data.py --model_name_or_path DIR --data_dir CL_Benchmark \
        --tasks t1,t2 --out generated_data/lora_gen_superni_t5 [--steps 5000 --batch_size 16 \
        --learning_rate 1e-3 --ratio 0.02 --seed 42 --max_train_samples N --save_generator DIR]
"""

import sys

from sapt.tools.pseudo_data import cli

if __name__ == "__main__":
    sys.exit(cli())

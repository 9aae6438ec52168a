"""How a task step trains: the method as the paper describes it.

sapt.train_task chooses the recipe once, when it sets a task step up, and asks it at each point where a
way of training could differ: the arguments it implies, the tokenisation, the query network's start,
the collator of the pseudo inputs, ARM's loss terms, the Trainer, and where dev is evaluated.
`TrainingRecipe` answers each with the paper's method; release-exact mode, what the official release's
code did instead, is a recipe of its own (sapt.training.release_training.ReleaseMode) and lives there.
"""

from __future__ import annotations

from ..reflection import AttentiveReflection
from .trainer import EveryNEpochs, LossTerm, SaptTrainer


class TrainingRecipe:
    """The paper's method: every answer is the default path's."""

    def apply_to_arguments(self, args) -> None:
        """Arguments the recipe implies (before the model is built): none."""

    def collator_options(self, tokenizer) -> dict:
        """Collator fields beyond the lengths: the tokenizer's own special tokens and padding."""
        return {}

    def init_query_net(self, model, backbone_config, seed: int) -> None:
        """A new router's query network: PyTorch's default init, as built (the method prescribes none)."""

    def pseudo_collator(self, train_collator, generation_collator):
        """Pseudo inputs stand for prompts: collated as the prompts of generation are."""
        return generation_collator

    def arm_terms(self, args, pseudo_sets, routing_means, collator, batch_size: int, num_blocks: int,
                  pseudo_tasks: list[str], seed: int) -> list[LossTerm]:
        """ARM as one loss term, λ · Σ_i KL_i, from its first step on (or after the warm-up of a remedy)."""
        reflection = AttentiveReflection(
            pseudo_sets, routing_means, collator, batch_size, num_blocks,
            first_step=args.arm_warmup_steps, target_floor=args.arm_target_floor,
        )
        return [LossTerm("arm", args.kl_ratio, lambda model, position, _: reflection.loss(model, position))]

    def trainer(self, training_args, num_train: int, **kwargs) -> SaptTrainer:
        """The Trainer of this step (kwargs: SaptTrainer's), over `num_train` training examples."""
        return SaptTrainer(args=training_args, **kwargs)

    def add_evaluation(self, trainer: SaptTrainer, args) -> bool:
        """Evaluate on dev as the Trainer's strategy says, or every `eval_every_epochs` epochs. Returns
        whether the Trainer evaluates (then a last evaluation closes training)."""
        training_args = trainer.args
        if args.eval_every_epochs:
            # save_strategy as the trainer left it (it turns checkpoints off under DeepSpeed)
            trainer.add_callback(EveryNEpochs(args.eval_every_epochs, save=training_args.save_strategy != "no"))
        return training_args.eval_strategy != "no" or bool(args.eval_every_epochs)

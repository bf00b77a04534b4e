"""``segany train``: the options are TrainConfig's (``--config FILE.yaml`` and/or ``--field-name VALUE``)."""

from __future__ import annotations

import argparse

from segany.cli import register


def add_args(p: argparse.ArgumentParser) -> None:
    from segany.training.trainer import build_arg_parser

    build_arg_parser(p)


def run(args: argparse.Namespace) -> int:
    from segany.training.trainer import train_main

    return train_main(args)


register("train", "train or fine-tune a model (the paper's simulated interactive training)", add_args, run)

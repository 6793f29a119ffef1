"""Find a lottery ticket for LeNet-300-100 on Fashion-MNIST with iterative magnitude pruning.

    apt-get install dataset-fashion-mnist
    .venv/bin/python examples/lottery_ticket.py --density 0.1 --rewind-epochs 0.5

Every round trains the current sub-network from Θ(0) (or from Θ(k) with late rewinding), then
keeps the 80% largest trained weights. The search is recorded in ``--output-dir``: stop it at any
time and run the same command again to continue after the last finished round.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from drt_peft import LotteryTicketConfig, find_lottery_ticket
from drt_peft.apps.offline import fashion_mnist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--density", type=float, default=0.1, help="the ticket's fraction of weights")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per round")
    parser.add_argument("--rewind-epochs", type=float, default=0.0, help="rewind point, in epochs (0: reset)")
    parser.add_argument("--output-dir", default="outputs/lottery-ticket")
    args = parser.parse_args()

    data = fashion_mnist()
    (x, y), (x_test, y_test) = data["train"], data["test"]
    batch_size = 128
    steps_per_epoch = len(y) // batch_size
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )

    def train(drt_model: nn.Module) -> dict[str, float]:
        optimizer = torch.optim.Adam([p for p in drt_model.parameters() if p.requires_grad], lr=1e-3)
        step = 0
        for epoch in range(args.epochs):
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
            for i in range(steps_per_epoch):
                chosen = order[i * batch_size : (i + 1) * batch_size]
                nn.functional.cross_entropy(drt_model(x[chosen]), y[chosen]).backward()
                optimizer.step()
                optimizer.zero_grad()
                step += 1
                drt_model.update_masks(step, optimizer)  # where Θ(k) is taken for late rewinding
        with torch.no_grad():
            accuracy = (drt_model(x_test).argmax(-1) == y_test).float().mean().item()
        return {"test_accuracy": accuracy}

    config = LotteryTicketConfig(
        density=args.density, rewind_step=round(args.rewind_epochs * steps_per_epoch), target_modules=["1", "3", "5"]
    )
    ticket = find_lottery_ticket(model, config, train, output_dir=args.output_dir)
    ticket.print_trainable_parameters()
    print(f"the ticket is saved in {args.output_dir}/ticket")


if __name__ == "__main__":
    main()

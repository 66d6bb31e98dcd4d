"""One output of the multi-output network as a plain tensor, for tools that expect a single tensor."""

from __future__ import annotations

from torch import Tensor, nn


class HeadOutput(nn.Module):
    """`HeadOutput(network, "seg")(x)` is `network(x)["seg"]`.

    MONAI's `verify_net_in_out` calls the network and checks the channels and dtype of one tensor,
    the output the metadata names `pred`; IGRegNet returns a dict (`seg` and one entry per task),
    described in metadata.json as one output per head. Wrapping the network for each head in turn
    lets that check run on every head (tests/test_model_zoo.py). The saliency maps use it too, setting
    `head` to each task in turn (scripts/saliency/maps.py).
    """

    def __init__(self, network: nn.Module, head: str) -> None:
        super().__init__()
        self.network = network
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)[self.head]

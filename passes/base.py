"""A pass is a small object: `requires` checks its preconditions, `run` transforms, `ensures` checks the result.
A broken invariant fails loudly at the pass that broke it, not three stages later."""
from __future__ import annotations

from typing import Any

from torch import nn

from slimc.capture import BlockStructure


class PassConditionError(AssertionError):
    """A pass's pre- or post-condition does not hold: a bug or an impossible request, never silent."""


class BlockPass:
    name = "pass"

    def requires(self, block: nn.Module, structure: BlockStructure, **inputs: Any) -> None:
        pass

    def run(self, block: nn.Module, structure: BlockStructure, **inputs: Any) -> Any:
        raise NotImplementedError

    def ensures(self, block: nn.Module, structure: BlockStructure, result: Any, **inputs: Any) -> None:
        pass

    def __call__(self, block: nn.Module, structure: BlockStructure, **inputs: Any) -> Any:
        self.requires(block, structure, **inputs)
        result = self.run(block, structure, **inputs)
        self.ensures(block, structure, result, **inputs)
        return result

    @staticmethod
    def check(condition: bool, message: str) -> None:
        if not condition:
            raise PassConditionError(message)

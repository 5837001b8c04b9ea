"""The actor that holds the prompt table's reference for a job, in a module of its own: an actor process imports the
module that defines its class, and this one imports nothing (the table's module imports torch, ~3 CPU-seconds of every
job's start-up for an actor that only returns a list)."""

from __future__ import annotations


class PromptTableHolder:
    """A small actor that holds the table's reference for the job: restartable actors get its name, a plain string,
    and fetch the table through it in their constructor, so a restarted actor fetches it again. (Ray logs an error
    line for every restartable actor whose constructor takes an object-store reference, even nested in a list or
    behind an actor handle; a name is neither.)"""

    def __init__(self, box: list):
        self.box = box  # [ObjectRef of the PromptTable]: nested, so it stays a reference

    def get(self) -> list:
        return self.box

"""The user commands of training: ``cnn-internals train``, ``finetune`` and ``reproduce``.

Each module has ``HELP`` (the one-line help of the verb), ``DESCRIPTION``,
``add_arguments(parser)`` and ``run(args) -> int``; the command-line
dispatcher's thin modules :mod:`interp.commands.train`,
:mod:`interp.commands.finetune` and :mod:`interp.commands.reproduce` register
them as verbs.
"""

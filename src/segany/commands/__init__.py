"""The ``segany`` sub-commands: one module per command family, each with ``add_args(parser)`` and
``run(args) -> exit code``. The table of commands is :data:`segany.cli.COMMANDS`; only the CLI
(``segany.cli`` and this package) imports these modules.
"""

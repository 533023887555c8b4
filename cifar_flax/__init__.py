"""cifar_flax: transfer learning on small images with a pretrained Flax ResNet50."""

__version__ = "0.2.0"


class UserError(Exception):
    """A problem the user can fix (a config field, a file or folder, the data, the weights, a run
    that diverged): the message is one line naming the thing that is wrong and the fix. The
    commands print it as ``error: <message>`` and exit with status 1 (cli.py); it is the only
    exception they treat as the user's."""

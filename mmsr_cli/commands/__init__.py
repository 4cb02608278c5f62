"""CLI commands, one module per stage. Importing this package registers them on ``app``."""

# Each line registers one stage's command; a stage that is not built has no line here.
from . import preprocess  # noqa: F401
from . import download  # noqa: F401,E402
from . import build_graphs  # noqa: F401,E402
from . import extract_features  # noqa: F401,E402
from . import build_codes  # noqa: F401,E402
from . import train  # noqa: F401,E402
from . import tune  # noqa: F401,E402
from . import evaluate  # noqa: F401,E402
from . import recommend  # noqa: F401,E402
from . import report  # noqa: F401,E402

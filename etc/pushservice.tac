# twistd -ny etc/pushservice.tac
#
# Builds the service from the config file named by $PUSHSERVICE_CONFIG
# (default: pushservice.conf beside this file). -y implies --no_save.
import os

from twisted.application import service

from pushservice.tap import Options, makeService

config = os.environ.get("PUSHSERVICE_CONFIG") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "pushservice.conf"
)
options = Options()
options.parseOptions(["--config", config])

application = service.Application("pushservice")
makeService(options).setServiceParent(application)

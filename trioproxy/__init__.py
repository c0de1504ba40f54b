"""trioproxy: a streaming HTTP/1.1 proxy on trio with bounded memory.

Public API (everything else is private):

* ``relay(source, sink, ...)`` - the bounded pump between any two trio streams.
* ``tunnel(a, b, ...)`` - two bounded pumps, both ways, half-close passed on.
* ``handle_connection(stream, config)`` - serve proxy requests on a stream
  your application accepted.
* ``serve(config)`` - listen and serve until cancelled.
* ``ProxyConfig`` - sizes, timeouts and mode.
* ``MemoryBudget`` - the byte budget shared by all pumps of a server.
* ``ProxyMeters`` - gauges, counters and the budget shared by connections.
* ``open_upstream_pool`` / ``UpstreamPool`` - idle upstream keep-alive
  connections that ``handle_connection(..., pool=)`` reuses.
* ``Shutdown`` - the drain state ``handle_connection(..., shutdown=)`` obeys.
"""

from ._budget import BudgetStatistics as BudgetStatistics
from ._budget import MemoryBudget as MemoryBudget
from ._config import ProxyConfig as ProxyConfig
from ._config import Upstream as Upstream
from ._connection import handle_connection as handle_connection
from ._errors import ProxyError as ProxyError
from ._metrics import ProxyMeters as ProxyMeters
from ._pool import UpstreamPool as UpstreamPool
from ._pool import open_upstream_pool as open_upstream_pool
from ._relay import BufferGauge as BufferGauge
from ._relay import RelayStatistics as RelayStatistics
from ._relay import relay as relay
from ._server import serve as serve
from ._shutdown import Shutdown as Shutdown
from ._tunnel import Tunnel as Tunnel
from ._tunnel import TunnelStatistics as TunnelStatistics
from ._tunnel import tunnel as tunnel
from ._upstream import OpenUpstream as OpenUpstream
from ._upstream import open_tcp_upstream as open_tcp_upstream
from ._version import VERSION

__version__ = VERSION

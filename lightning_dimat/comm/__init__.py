"""Communication between agents: placement on processes, the state transport and its codecs, the ledger."""

from lightning_dimat.comm.compression import COMPRESSIONS, Codec, check_compression, resolve_compression
from lightning_dimat.comm.deadline import Deadline, exchange_with_deadline
from lightning_dimat.comm.gather import gather_by_agent, gather_fields_by_agent
from lightning_dimat.comm.ledger import CommunicationLedger, receivers_of
from lightning_dimat.comm.placement import agents_on_rank, rank_of_agent
from lightning_dimat.comm.transport import ExchangeError, ExchangePlan, exchange_states, plan_exchange

__all__ = [
    "COMPRESSIONS",
    "Codec",
    "CommunicationLedger",
    "Deadline",
    "ExchangeError",
    "ExchangePlan",
    "agents_on_rank",
    "check_compression",
    "exchange_states",
    "exchange_with_deadline",
    "gather_by_agent",
    "gather_fields_by_agent",
    "plan_exchange",
    "rank_of_agent",
    "receivers_of",
    "resolve_compression",
]

"""CubeVS: the node's sandbox network service (one per `cube serve`).

Networks of guests that outlive the service (runtime/supervisor) outlive it too: a
network whose record names a live owner is kept by the start's sweep (sweep.py), its
policy maps and program stay in place (pinned), and the next service takes it over with
`sandbox_network(..., adopt=True)`. A service that lets its sandboxes run on when it
stops (`detach`) leaves their networks, maps and the node's host set-up as they are.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import shutil
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import trio
from pyroute2 import IPRoute

from appliance.config import Config
from appliance.net import egress_proxy, host, links, netns
from appliance.net.addressing import TAP_NAME, Addressing, Plan
from appliance.net.dns import Answer, Resolver, Upstream, host_upstreams
from appliance.net.ebpf import FLAG_INTERNET, PolicyProgram, pin_dir_of
from appliance.net.egress_proxy import IPAddress, SandboxEgress, SecretValues
from appliance.net.policy import MAX_ENTRIES_PER_LIST, CompiledList, Network, NetworkPolicy, PolicyError
from appliance.net.sweep import Records, sweep
from appliance.process_identity import ProcessIdentity

log = logging.getLogger(__name__)

_SANDBOX_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$")
# Addresses learned from DNS answers stay in the maps at least this long and
# this much past their TTL: guests and their libraries cache answers too.
_LEARNED_MIN_S = 60.0
_LEARNED_GRACE_S = 60.0
_EXPIRY_CHECK_S = 5.0
_LISTS = ("allow", "deny")
_ALL_IPV4 = ipaddress.ip_network("0.0.0.0/0")
_NO_ADDRESS = ipaddress.ip_address("0.0.0.0")  # matching a rule by name alone
MAX_RULED_NAMES = 1024  # names per sandbox whose answers the egress proxy checks against


class NetworkUnenforced(RuntimeError):
    """eBPF enforcement is unavailable and the config does not allow running without it."""


@dataclass(frozen=True)
class SandboxNetwork:
    sandbox_id: str
    netns: str  # "cube-<sandbox_id>"
    netns_path: str  # /run/netns/cube-<sandbox_id>; setns() into it, or `ip netns exec`
    tap: str  # "tap0", inside the netns
    host_ip: str  # host → host_ip:PORT reaches guest_ip:PORT
    guest_ip: str  # 169.254.0.2/30, the same in every sandbox
    gateway_ip: str  # 169.254.0.1, on tap0: the guest's default route
    resolver_ip: str  # the guest's nameserver (its gateway; port 53 goes to the node resolver)
    # IPv6 (the guest may use it or not): guest_ip6/126 via gateway_ip6, the same in every
    # sandbox; host → [host_ip6]:PORT reaches the guest.
    host_ip6: str
    guest_ip6: str
    gateway_ip6: str


@dataclass
class _Live:
    plan: Plan
    ifindex: int
    policy: NetworkPolicy
    allow: CompiledList
    deny: CompiledList
    lock: trio.Lock = field(default_factory=trio.Lock)
    # list name → address → (trio.current_time() at which it expires, the name it answered)
    learned: dict[str, dict[Network, tuple[float, str]]] = field(
        default_factory=lambda: {n: {} for n in _LISTS}
    )
    installed: dict[str, set[Network]] = field(default_factory=lambda: {n: set() for n in _LISTS})
    detached: bool = False  # its guest runs on after this service: leave everything in place
    # For the egress proxy: name → address → expiry, the resolver's answers for names its rules
    # cover; and the proxy's scope while it runs (a policy with rules).
    answers: dict[str, dict[IPAddress, float]] = field(default_factory=dict)
    proxy: trio.CancelScope | None = None

    def lists(self, list_name: str) -> CompiledList:
        return self.allow if list_name == "allow" else self.deny

    def desired(self, list_name: str) -> set[Network]:
        return set(self.lists(list_name).networks) | set(self.learned[list_name])


class CubeVS:
    def __init__(
        self,
        config: Config,
        addressing: Addressing,
        records: Records,
        program: PolicyProgram | None,
        unenforced_reason: str,
    ) -> None:
        self.config = config
        self.addressing = addressing
        self._records = records
        self._program = program
        self.unenforced_reason = unenforced_reason
        self._live: dict[str, _Live] = {}
        self._by_host_ip: dict[str, _Live] = {}
        # Networks a previous service left whose guests run on, until adopted or released;
        # what their lists held in the maps, by sandbox id.
        self._kept: dict[str, Plan] = {}
        self._kept_entries: dict[str, dict[str, set[Network]]] = {}
        self._detached = 0
        self._opened = host.parse_open_networks(config.operator_open_networks, addressing)
        # Always-blocked destinations: set at start, refreshed when the host's addresses change.
        self._blocked = host.BlockedSet({})
        # What the egress proxy resolves `${e2b.secrets.NAME}` with; set by the service that owns
        # the secrets (master), None: rules naming secrets get 502s.
        self.secret_values: SecretValues | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def enforced(self) -> bool:
        return self._program is not None

    # --- service lifetime -------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def start(
        cls, config: Config, *, dns_upstreams: Sequence[str] | None = None
    ) -> AsyncIterator[CubeVS]:
        """Set up the host, load the programs, run the resolver; undo it all on exit.

        `dns_upstreams` ("ip" or "ip:port") defaults to the host's /etc/resolv.conf.
        """
        addressing = Addressing(config.host_network)
        records = Records(config.run_dir / "net")
        upstreams = (
            [Upstream.parse(u) for u in dns_upstreams] if dns_upstreams is not None else host_upstreams()
        )

        def prepare_host() -> host.BlockedSet:
            netns.prepare_netns_dir()
            service._kept = sweep(records)
            host.set_up(addressing)
            return host.blocked_set(addressing, service._opened)

        service = cls(config, addressing, records, None, "not loaded yet")
        try:
            # Subscribed before the first listing: no address change falls in between.
            with _address_changes() as changes:
                service._blocked = await trio.to_thread.run_sync(prepare_host)
                kept = await trio.to_thread.run_sync(_veth_indexes, service._kept)
                service._program, service.unenforced_reason, held = await trio.to_thread.run_sync(
                    _load_program, addressing, service._blocked, frozenset(kept.values())
                )
                service._kept_entries = {sandbox_id: held[i] for sandbox_id, i in kept.items() if i in held}
                if service._program is None:
                    log.warning("CubeVS: eBPF enforcement unavailable: %s", service.unenforced_reason)
                async with trio.open_nursery() as nursery:
                    service._nursery = nursery
                    resolver = Resolver(addressing.resolver_ip, upstreams, service._learn, service._may_ask)
                    await nursery.start(resolver.serve)
                    nursery.start_soon(service._expire_learned)
                    nursery.start_soon(service._follow_host_addresses, changes)
                    yield service
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(service._shut_down)

    def _shut_down(self) -> None:
        if self._program is not None:
            self._program.close()
        if self._detached or self._kept:
            # Guests run on: their networks keep the host's NAT and resolver address, and their
            # programs the pinned maps, for the next service.
            return
        host.tear_down(self.addressing)
        # Pins exist so a crashed service keeps enforcing; after a clean stop no
        # sandbox network is left to enforce on.
        shutil.rmtree(pin_dir_of(self.addressing), ignore_errors=True)

    # --- sandbox networks -------------------------------------------------

    @asynccontextmanager
    async def sandbox_network(
        self, sandbox_id: str, slot: int, tap_owner_uid: int, policy: NetworkPolicy, *, adopt: bool = False
    ) -> AsyncIterator[SandboxNetwork]:
        """The sandbox's network for the body's duration: built, or with `adopt` taken over from
        the previous service (its kept network for this sandbox and slot; KeyError if there is
        none). Removed at the end unless `detach`ed meanwhile."""
        self._refuse_network(sandbox_id)
        allow, deny = policy.compiled()
        plan = await self._claim_plan(sandbox_id, slot, adopt)
        live: _Live | None = None
        try:
            ifindex = await self._links_of(plan, tap_owner_uid, adopt)
            live = _Live(plan, ifindex, policy, allow, deny)
            if adopt:
                self._take_kept_entries(live)
            self._live[sandbox_id] = live
            self._by_host_ip[plan.host_ip] = live
            if self._program is not None:
                await trio.to_thread.run_sync(self._enforce, live)
            await self._start_proxy(live)
            yield SandboxNetwork(
                sandbox_id=sandbox_id,
                netns=plan.netns,
                netns_path=str(netns.netns_path(plan.netns)),
                tap=TAP_NAME,
                host_ip=plan.host_ip,
                guest_ip=plan.guest_ip,
                gateway_ip=plan.gateway_ip,
                resolver_ip=plan.gateway_ip,
                host_ip6=plan.host_ip6,
                guest_ip6=plan.guest_ip6,
                gateway_ip6=plan.gateway_ip6,
            )
        finally:
            with trio.CancelScope(shield=True):
                await self._end_network(plan, live)

    def _refuse_network(self, sandbox_id: str) -> None:
        if not self.enforced and not self.config.allow_unenforced_network:
            raise NetworkUnenforced(
                f"eBPF network enforcement is not active ({self.unenforced_reason}); "
                "run `cube doctor`, or set allow_unenforced_network = true to run sandboxes without it"
            )
        if not _SANDBOX_ID.match(sandbox_id):
            raise ValueError(f"sandbox id {sandbox_id!r} cannot name a network namespace")
        if sandbox_id in self._live:
            raise ValueError(f"sandbox {sandbox_id} already has a network")

    async def _claim_plan(self, sandbox_id: str, slot: int, adopt: bool) -> Plan:
        """The sandbox's plan, recorded (new), or the kept one it must match (adopted)."""
        plan = self.addressing.plan(sandbox_id, slot)
        if not adopt:
            await trio.to_thread.run_sync(self._records.write, plan)
            return plan
        kept = self._kept.pop(sandbox_id, None)
        if kept != plan:
            if kept is not None:
                await self._release_kept(kept)
            raise KeyError(f"no kept network of sandbox {sandbox_id} in slot {slot}")
        return plan

    async def _links_of(self, plan: Plan, tap_owner_uid: int, adopt: bool) -> int:
        """The veth's ifindex: of the links built now, or of the kept ones."""
        if not adopt:
            return await trio.to_thread.run_sync(links.build, plan, tap_owner_uid)
        ifindex = await trio.to_thread.run_sync(_veth_index, plan)
        if not ifindex:
            raise KeyError(f"the kept network of sandbox {plan.sandbox_id} lost its veth")
        return ifindex

    def _take_kept_entries(self, live: _Live) -> None:
        """What the maps hold for an adopted sandbox: its lists, plus addresses learned from its
        DNS answers (kept as learned, for the usual time; their names are not known)."""
        live.installed = self._kept_entries.pop(live.plan.sandbox_id, {n: set() for n in _LISTS})
        expiry = trio.current_time() + _LEARNED_MIN_S + _LEARNED_GRACE_S
        for n in _LISTS:
            learned = live.installed[n] - set(live.lists(n).networks)
            live.learned[n] = {address: (expiry, "") for address in learned}

    async def _end_network(self, plan: Plan, live: _Live | None) -> None:
        """Remove the sandbox's network, or leave it to the next service if `detach`ed."""
        if live is not None:
            self._live.pop(plan.sandbox_id, None)
            self._by_host_ip.pop(plan.host_ip, None)
            if live.proxy is not None:
                live.proxy.cancel()
        if live is not None and live.detached:
            self._detached += 1
            return
        if live is not None:
            async with live.lock:
                await trio.to_thread.run_sync(self._release, live)
        else:
            await trio.to_thread.run_sync(links.remove, plan)
        await trio.to_thread.run_sync(self._records.delete, plan.sandbox_id)

    async def set_owner(self, sandbox_id: str, owner: ProcessIdentity) -> None:
        """Name the process that keeps the sandbox's guest running: while it runs, the sweep of
        the next start keeps this network (sweep.py)."""
        await trio.to_thread.run_sync(self._records.write, self._live[sandbox_id].plan, owner)

    def detach(self, sandbox_id: str) -> None:
        """Leave the sandbox's network as it is when its `sandbox_network` ends (its guest runs
        on, for the next service to adopt): links, policy maps, record."""
        self._live[sandbox_id].detached = True

    async def release_kept(self, keep: set[str]) -> list[str]:
        """Remove the kept networks of sandboxes other than `keep` (no guest of theirs is left to
        adopt); returns their ids."""
        released = [sandbox_id for sandbox_id in self._kept if sandbox_id not in keep]
        for sandbox_id in released:
            await self._release_kept(self._kept.pop(sandbox_id))
        return released

    async def _release_kept(self, plan: Plan) -> None:
        entries = self._kept_entries.pop(plan.sandbox_id, {n: set() for n in _LISTS})

        def release() -> None:
            index = _veth_index(plan)
            links.remove(plan)
            if self._program is not None and index:
                for list_name in _LISTS:
                    self._program.remove(list_name, index, entries[list_name])
                self._program.forget(index)
            self._records.delete(plan.sandbox_id)

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(release)

    def _enforce(self, live: _Live) -> None:
        program = self._require_program()
        self._sync(live, live.policy.allow_internet_access)
        program.attach(live.ifindex)

    def _release(self, live: _Live) -> None:
        links.remove(live.plan)
        if self._program is not None:
            for list_name in _LISTS:
                self._program.remove(list_name, live.ifindex, live.installed[list_name])
            self._program.forget(live.ifindex)

    def _require_program(self) -> PolicyProgram:
        if self._program is None:
            raise NetworkUnenforced(f"eBPF network enforcement is not active ({self.unenforced_reason})")
        return self._program

    def _sync(self, live: _Live, internet: bool) -> None:
        """Make the maps match `live`'s lists; never more permissive than old or new in between."""
        program = self._require_program()

        def configure(flag: bool) -> None:
            program.configure(live.ifindex, live.plan, internet=flag)

        allow_now, deny_now = live.installed["allow"], live.installed["deny"]
        allow_new, deny_new = live.desired("allow"), live.desired("deny")
        current = program.sandboxes.get(program.sandboxes.Key(live.ifindex))
        internet_now = bool(current is not None and current.flags & FLAG_INTERNET)
        # Tighten first (fewer allows, more denies, internet only if old and new
        # both allow it), then loosen: no packet sees a policy looser than both.
        # `installed` follows every step, so a failure (maps full) leaves it true
        # and the caller can sync back to the previous policy.
        configure(internet and internet_now)
        program.remove("allow", live.ifindex, allow_now - allow_new)
        live.installed["allow"] = allow_now & allow_new
        program.add("deny", live.ifindex, deny_new - deny_now)
        live.installed["deny"] = deny_now | deny_new
        program.add("allow", live.ifindex, allow_new - allow_now)
        live.installed["allow"] = allow_new
        program.remove("deny", live.ifindex, deny_now - deny_new)
        live.installed["deny"] = deny_new
        configure(internet)

    async def update_policy(self, sandbox_id: str, policy: NetworkPolicy) -> None:
        """Replace a running sandbox's policy; in effect when this returns (well under 1 s).

        Raises PolicyError (nothing changed) or KeyError (no such sandbox network).
        """
        live = self._live[sandbox_id]
        allow, deny = policy.compiled()
        async with live.lock:
            old = (live.policy, live.allow, live.deny, live.learned)
            live.policy, live.allow, live.deny = policy, allow, deny
            # Learned addresses stay only for names the new lists still match.
            live.learned = {
                n: {a: (t, q) for a, (t, q) in old[3][n].items() if live.lists(n).matches_domain(q)}
                for n in _LISTS
            }
            try:
                await self._start_proxy(live)
            except (OSError, RuntimeError) as e:  # nft or the listener, in a netns going away
                live.policy, live.allow, live.deny, live.learned = old
                raise PolicyError(f"the egress proxy for the rules could not start: {e}") from e
            if self._program is None:
                return
            try:
                await trio.to_thread.run_sync(self._sync, live, policy.allow_internet_access)
            except Exception as e:
                live.policy, live.allow, live.deny, live.learned = old
                await trio.to_thread.run_sync(self._sync, live, live.policy.allow_internet_access)
                raise PolicyError(f"policy could not be applied, previous policy kept: {e}") from e

    def counters(self, sandbox_id: str) -> dict[str, int]:
        """Packets and bytes the sandbox sent that were allowed / dropped (zeros if unenforced)."""
        live = self._live[sandbox_id]
        if self._program is None:
            return dict.fromkeys(("allowed_packets", "allowed_bytes", "dropped_packets", "dropped_bytes"), 0)
        return self._program.read_counters(live.ifindex)

    async def set_policy_attached(self, sandbox_id: str, attached: bool) -> None:
        """Detach or re-attach the policy program (for `cube bench net`'s with/without comparison)."""
        live = self._live[sandbox_id]
        program = self._require_program()
        await trio.to_thread.run_sync(program.attach if attached else program.detach, live.ifindex)

    # --- the egress proxy (network.rules) ------------------------------------

    async def _start_proxy(self, live: _Live) -> None:
        """Once the policy has rules: the sandbox's HTTP goes through the egress proxy, which reads
        the policy of the moment per request (a later policy without rules: it forwards untouched)."""
        if live.proxy is not None or not live.policy.rules or self._nursery is None:
            return
        sandbox_id = live.plan.sandbox_id

        def answered(name: str) -> frozenset[IPAddress]:
            now = trio.current_time()
            return frozenset(a for a, t in live.answers.get(name, {}).items() if t > now)

        egress = SandboxEgress(
            sandbox_id=sandbox_id,
            netns_path=str(netns.netns_path(live.plan.netns)),
            gateway_ip=live.plan.gateway_ip,
            policy=lambda: live.policy,
            answered=answered,
            secret_values=lambda: self.secret_values,
        )
        live.proxy = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            assert live.proxy is not None
            with live.proxy:
                try:
                    await egress_proxy.serve(egress, task_status=task_status)
                except Exception:  # this sandbox's HTTP stops; CubeVS and the others go on
                    log.exception("CubeVS: the egress proxy of sandbox %s failed", sandbox_id)
                    if not task_status_started:
                        raise

        task_status_started = False
        await self._nursery.start(run)
        task_status_started = True

    def _note_ruled_answer(self, live: _Live, answer: Answer) -> None:
        """Remember what the resolver told the sandbox a ruled name is: only there may the proxy
        send the rule's secrets."""
        if not any(rule.matches(answer.qname, _NO_ADDRESS) for rule in live.policy.rules):
            return
        known = live.answers.setdefault(answer.qname, {})
        now = trio.current_time()
        for address, ttl in answer.addresses:
            known[address] = max(
                known.get(address, 0.0), now + max(float(ttl), _LEARNED_MIN_S) + _LEARNED_GRACE_S
            )
        for address in [a for a, t in known.items() if t <= now]:
            del known[address]
        # A wildcard rule matches endless names: the ones remembered longest ago go first.
        while len(live.answers) > MAX_RULED_NAMES:
            del live.answers[
                min(live.answers, key=lambda name: max(live.answers[name].values(), default=0.0))
            ]

    # --- DNS ----------------------------------------------------------------

    def _may_ask(self, client_ip: str, qname: str | None) -> bool:
        """May this client have this name resolved upstream?

        Only sandboxes use the resolver. One with egress may resolve anything. One without
        (allow_internet_access false, or 0.0.0.0/0 denied) gets only the names its allow list's
        domains need: any other name would carry data out in the query to whoever serves it.
        """
        live = self._by_host_ip.get(client_ip)
        if live is None:
            return False
        if live.policy.allow_internet_access and _ALL_IPV4 not in live.deny.networks:
            return True
        return qname is not None and live.allow.matches_domain(qname)

    async def _learn(self, client_ip: str, answer: Answer) -> None:
        live = self._by_host_ip.get(client_ip)
        if live is not None:
            self._note_ruled_answer(live, answer)
        if live is None or self._program is None:
            return
        async with live.lock:
            if self._live.get(live.plan.sandbox_id) is not live:
                return  # torn down meanwhile
            changed = False
            for list_name in _LISTS:
                if live.lists(list_name).matches_domain(answer.qname):
                    changed |= self._remember(live.learned[list_name], list_name, answer)
            if changed:
                await trio.to_thread.run_sync(self._sync, live, live.policy.allow_internet_access)

    def _remember(self, learned: dict[Network, tuple[float, str]], list_name: str, answer: Answer) -> bool:
        changed = False
        for address, ttl in answer.addresses:
            if list_name == "allow" and self._blocked.blocks(address):
                # A name may resolve to anything (DNS rebinding); the program would drop
                # it anyway, an entry would only take room.
                continue
            expiry = trio.current_time() + max(float(ttl), _LEARNED_MIN_S) + _LEARNED_GRACE_S
            network = ipaddress.ip_network(address)
            if network in learned:
                expiry = max(expiry, learned[network][0])
            learned[network] = (expiry, answer.qname)
            changed = True
        while len(learned) > MAX_ENTRIES_PER_LIST:
            del learned[min(learned, key=lambda n: learned[n][0])]
        return changed

    async def _expire_learned(self) -> None:
        while True:
            await trio.sleep(_EXPIRY_CHECK_S)
            for live in list(self._live.values()):
                async with live.lock:
                    if self._live.get(live.plan.sandbox_id) is not live:
                        continue
                    now = trio.current_time()
                    expired = False
                    for learned in live.learned.values():
                        for network in [n for n, (t, _q) in learned.items() if t <= now]:
                            del learned[network]
                            expired = True
                    if expired:
                        await trio.to_thread.run_sync(self._sync, live, live.policy.allow_internet_access)

    # --- the host's addresses ----------------------------------------------

    async def _follow_host_addresses(self, changes: socket.socket) -> None:
        """Keep the host's addresses in the always-blocked set as they come and go."""
        while True:
            await trio.lowlevel.wait_readable(changes)
            while True:  # one refresh for a burst of changes
                try:
                    changes.recv(_NETLINK_BUFFER)
                except BlockingIOError:
                    break
                except OSError as e:  # ENOBUFS: changes were lost, the listing below has them
                    if e.errno != errno.ENOBUFS:
                        raise
            try:
                blocked = await trio.to_thread.run_sync(host.blocked_set, self.addressing, self._opened)
                if blocked != self._blocked:
                    if self._program is not None:
                        await trio.to_thread.run_sync(self._program.set_blocked, blocked.entries)
                    self._blocked = blocked
                    log.info("CubeVS: the host's addresses changed; always-blocked set refreshed")
            except Exception:  # netlink or map trouble: keep the set, the next change retries
                log.exception("CubeVS: refreshing the host's addresses in the always-blocked set failed")


_NETLINK_BUFFER = 1 << 16
_RTMGRP_IPV4_IFADDR = 0x10
_RTMGRP_IPV6_IFADDR = 0x100


@contextmanager
def _address_changes() -> Iterator[socket.socket]:
    """A non-blocking netlink socket that becomes readable whenever an address comes or goes."""
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE
    ) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV6_IFADDR))
        yield sock


def _veth_index(plan: Plan) -> int:
    """The ifindex of a kept network's host-side veth (0: gone)."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=plan.host_veth)
    return int(found[0]) if found else 0


def _veth_indexes(plans: dict[str, Plan]) -> dict[str, int]:
    return {sandbox_id: i for sandbox_id, plan in plans.items() if (i := _veth_index(plan))}


def _load_program(
    addressing: Addressing, blocked: host.BlockedSet, keep: frozenset[int]
) -> tuple[PolicyProgram | None, str, dict[int, dict[str, set[Network]]]]:
    """The program and what its maps hold for the kept networks' veths `keep`."""
    pin_dir = pin_dir_of(addressing)
    try:
        try:
            program = PolicyProgram(pin_dir)
        except Exception:
            if not pin_dir.exists():
                raise
            # Maps pinned by an older build may not match this program's layout.
            # The sweep already removed the networks they served (programs still
            # attached anywhere hold their maps by reference, not by pin).
            log.warning("CubeVS: pinned maps in %s unusable; recreating them", pin_dir)
            shutil.rmtree(pin_dir)
            program = PolicyProgram(pin_dir)
    except Exception as e:  # bcc missing, no headers, no bpffs, verifier: all mean "unenforced"
        return None, f"{type(e).__name__}: {e}", {}
    # The sweep removed every network a previous run left but the kept ones; their entries go too.
    held = program.forget_all(keep)
    program.set_blocked(blocked.entries)
    return program, "", held

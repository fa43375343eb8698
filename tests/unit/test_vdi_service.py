"""The lock holder's bookkeeping on its sheep: the write gate and the Writer."""

from __future__ import annotations

import asyncio

from sheep.vdi_service import WriteGate, Writer, handoff_idle_s


def test_a_write_woken_by_a_reopening_waits_while_the_gate_closed_again():
    """Two pauses back to back (a snapshot then a handoff, from one task): the second
    closes the gate before a write woken by the first's reopening runs. That write
    must not slip in while the second pause's work runs."""

    async def main() -> None:
        gate = WriteGate()
        release = asyncio.Event()
        seen: list[int] = []

        async def first() -> None:
            await release.wait()

        async def second() -> None:
            await asyncio.sleep(0.01)  # the woken write runs now, if it will
            seen.append(gate.in_flight)

        async def both() -> None:
            await gate.closed(first)
            await gate.closed(second)

        pauses = asyncio.create_task(both())
        await asyncio.sleep(0)  # the first pause has closed the gate
        writer = asyncio.create_task(gate.enter())
        await asyncio.sleep(0)
        assert not writer.done() and gate.in_flight == 0
        release.set()
        await pauses
        assert seen == [0], "a write passed the gate while it was closed"
        await writer
        assert gate.in_flight == 1
        gate.leave()

    asyncio.run(main())


def test_a_writer_with_changes_queued_is_busy_even_when_flushed_and_idle():
    writer = Writer("vdi")
    change = writer.begin(0.0)
    writer.end(0.0, change, durable=True)  # a FUA write: flushed
    later = handoff_idle_s + 1
    assert writer.busy(later) is None
    writer.queued += 1  # waiting in the I/O scheduler, or at the gate
    assert writer.busy(later) == "1 of its writes are in flight"
    writer.queued -= 1
    assert writer.busy(later) is None

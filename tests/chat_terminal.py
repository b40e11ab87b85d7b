#!/usr/bin/env python3
"""Drive `fastkv chat` on a pseudo-terminal as a person would, and check what a
person sees: the line editor, history across sessions, multi-line input, Ctrl-C that
stops an answer, Ctrl-D that leaves.

    python3 tests/chat_terminal.py FASTKV_BINARY MODEL

Prints the session's transcript (the terminal's bytes, escape sequences removed) and
exits non-zero, naming the step, when something is not as expected. Run by
tests/cli.rs `chat_on_a_terminal_edits_lines_keeps_history_and_stops_on_ctrl_c`.
"""
import os
import pty
import re
import select
import sys
import tempfile
import time

EXE, MODEL = sys.argv[1], sys.argv[2]
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\r")


class Chat:
    def __init__(self, state_dir):
        env = dict(os.environ, XDG_STATE_HOME=state_dir, TERM="xterm")
        args = [EXE, "chat", "-m", MODEL, "-c", "2048", "-n", "300", "--temp", "0",
                "--system", "You are a helpful assistant."]
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execve(EXE, args, env)
        self.seen = b""
        self.mark = 0

    def send(self, data):
        os.write(self.fd, data.encode())

    def expect(self, what, step, timeout=120):
        """Wait until `what` appears after the last match; the text up to it."""
        deadline = time.time() + timeout
        while True:
            plain = ANSI.sub(b"", self.seen)
            at = plain.find(what.encode(), self.mark)
            if at >= 0:
                text = plain[self.mark:at + len(what)]
                self.mark = at + len(what)
                return text.decode(errors="replace")
            left = deadline - time.time()
            if left <= 0 or not self.read(left):
                fail(step, f"waited for {what!r}", plain[self.mark:])

    def read(self, timeout):
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # the child closed the terminal
            return False
        self.seen += chunk
        return bool(chunk)

    def wait_exit(self, step, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            self.read(0.1)
        fail(step, "still running", b"")

    def alive(self):
        return os.waitpid(self.pid, os.WNOHANG)[0] == 0

    def transcript(self):
        return ANSI.sub(b"", self.seen).decode(errors="replace")


def fail(step, why, tail):
    print(f"FAIL {step}: {why}; after the last match:\n{tail.decode(errors='replace')}")
    sys.exit(1)


def main():
    state = tempfile.mkdtemp()
    chat = Chat(state)
    chat.expect("> ", "banner")

    # An answer, written as it comes.
    chat.send("What is the capital of France?\r")
    answer = chat.expect("> ", "a plain question")
    if "Paris" not in answer:
        fail("a plain question", "no Paris in the answer", answer.encode())

    # Ctrl-C stops a long answer; the chat goes on.
    chat.send("Write a very long story about a dragon who guards a library.\r")
    chat.expect("guards a library.", "the long question")
    # Some of the answer first.
    started = time.time()
    while len(ANSI.sub(b"", chat.seen)) < chat.mark + 40 and time.time() - started < 60:
        chat.read(1)
    chat.send("\x03")
    chat.expect("[stopped]", "Ctrl-C during an answer", timeout=20)
    chat.expect("> ", "the prompt after Ctrl-C", timeout=20)
    if not chat.alive():
        fail("Ctrl-C during an answer", "the process ended", b"")

    # The up arrow brings back the last message; Ctrl-U clears it again.
    chat.send("\x1b[A")
    chat.expect("guards a library.", "history (up arrow)", timeout=10)
    chat.send("\x15")

    # A line ending in \ goes on: a continuation prompt, then one message.
    chat.send("What is the capital\\\r")
    chat.expect(". ", "continuation prompt", timeout=10)
    chat.send("of Italy?\r")
    reply = chat.expect("> ", "a two-line message")
    # One message, so one answer (each ends with a statistics line).
    if "Rome" not in reply or reply.count("new prompt tokens") != 1:
        fail("a two-line message", "not one answer naming Rome", reply.encode())

    # Ctrl-D at the prompt leaves, cleanly.
    chat.send("\x04")
    code = chat.wait_exit("Ctrl-D at the prompt")
    if code != 0:
        fail("Ctrl-D at the prompt", f"exit code {code}", b"")
    first = chat.transcript()

    # A new session remembers the last one's messages; Ctrl-C at the prompt leaves.
    again = Chat(state)
    again.expect("> ", "second banner")
    again.send("\x1b[A")
    again.expect("of Italy?", "history from the last session", timeout=10)
    again.send("\x03")
    code = again.wait_exit("Ctrl-C at the prompt")
    if code != 0:
        fail("Ctrl-C at the prompt", f"exit code {code}", b"")

    print(first)
    print("--- a second session ---")
    print(again.transcript())
    print("OK")


if __name__ == "__main__":
    main()

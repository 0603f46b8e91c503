"""The streaming client: ``chat`` sends one chat completion and returns one ``ChatResult`` whatever the
server or network does; ``timed_io`` reads the response's bytes with kernel arrival timestamps (TTFT is
stamped by the kernel, not by a busy event loop); ``sse`` parses the stream without doing I/O."""

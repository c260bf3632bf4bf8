// A small Java kernel for the Cube agent (java_kernel.py): one JVM per context, cells run by
// JShell in this same JVM (the "local" execution engine: no second JVM, no JDI).
//
// Requests arrive on stdin, one per line, tab-separated; text is base64 (UTF-8):
//   execute <id> <code> [<key>:<value> ...]   a cell; the pairs are system properties for it alone
//   env [<key>:<value> ...]                   sandbox env vars: system properties from now on
//   interrupt                                 stop the running cell
// Replies leave as JSON lines on the file descriptor in CUBE_REPLY_FD, so nothing user code
// prints can corrupt the protocol. Java cannot change its own environment: like E2B's Java
// kernel, env vars are visible to code as system properties (System.getProperty).
import java.io.BufferedReader;
import java.io.ByteArrayInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.Base64;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.stream.Collectors;
import jdk.jshell.Diag;
import jdk.jshell.EvalException;
import jdk.jshell.JShell;
import jdk.jshell.JShellException;
import jdk.jshell.Snippet;
import jdk.jshell.SnippetEvent;
import jdk.jshell.SourceCodeAnalysis;

public final class JavaKernel {
    private static final Base64.Decoder BASE64 = Base64.getDecoder();
    private static PrintStream replies;
    private static volatile String current; // id of the cell whose output is being collected
    private static volatile boolean stopped; // the running cell was interrupted
    private static int executionCount;

    private record Cell(String id, String code, Map<String, String> properties) {}

    public static void main(String[] args) throws Exception {
        replies = new PrintStream(new FileOutputStream("/proc/self/fd/" + System.getenv("CUBE_REPLY_FD")), true,
                StandardCharsets.UTF_8);
        InputStream requests = System.in;
        PrintStream discarded = System.out;
        System.setOut(new CellStream(new Relay("stdout", discarded)));
        System.setErr(new CellStream(new Relay("stderr", discarded)));
        System.setIn(new ByteArrayInputStream(new byte[0]));
        JShell shell = JShell.builder().executionEngine("local").build();
        LinkedBlockingQueue<Cell> cells = new LinkedBlockingQueue<>();
        Thread reader = new Thread(() -> readRequests(requests, shell, cells), "requests");
        reader.setDaemon(true);
        reader.start();
        reply(Map.of("type", "ready"));
        while (true) {
            Cell cell = cells.take();
            if (cell.id() == null) {
                System.exit(0); // stdin closed: the agent is gone
            }
            execute(shell, cell);
        }
    }

    /** On its own thread, so that an `interrupt` reaches a running cell. */
    private static void readRequests(InputStream requests, JShell shell, LinkedBlockingQueue<Cell> cells) {
        try (BufferedReader in = new BufferedReader(new InputStreamReader(requests, StandardCharsets.UTF_8))) {
            String line;
            while ((line = in.readLine()) != null) {
                String[] fields = line.split("\t", -1);
                try {
                    switch (fields[0]) {
                        case "execute" -> cells.put(new Cell(fields[1], text(fields[2]), pairs(fields, 3)));
                        case "env" -> cells.put(new Cell("", null, pairs(fields, 1)));
                        case "interrupt" -> {
                            stopped = true;
                            shell.stop();
                        }
                        default -> { }
                    }
                } catch (IndexOutOfBoundsException | IllegalArgumentException e) {
                    System.err.println("JavaKernel: malformed request ignored: " + e); // the agent's bug
                }
            }
        } catch (IOException | InterruptedException e) {
            // fall through: treated as the end of input
        }
        cells.add(new Cell(null, null, Map.of()));
    }

    private static String text(String base64) {
        return new String(BASE64.decode(base64), StandardCharsets.UTF_8);
    }

    private static Map<String, String> pairs(String[] fields, int from) {
        Map<String, String> pairs = new LinkedHashMap<>();
        for (int i = from; i < fields.length; i++) {
            int colon = fields[i].indexOf(':');
            if (colon > 0) {
                pairs.put(text(fields[i].substring(0, colon)), text(fields[i].substring(colon + 1)));
            }
        }
        return pairs;
    }

    private static void execute(JShell shell, Cell cell) {
        if (cell.code() == null) { // `env`: no cell, no count
            cell.properties().forEach(System::setProperty);
            return;
        }
        executionCount += 1;
        Map<String, String> saved = new LinkedHashMap<>();
        cell.properties().forEach((key, value) -> saved.put(key, System.setProperty(key, value)));
        current = cell.id();
        stopped = false;
        try {
            runCell(shell, cell.id(), cell.code());
        } finally {
            System.out.flush();
            System.err.flush();
            current = null;
            saved.forEach((key, value) -> {
                if (value == null) System.clearProperty(key); else System.setProperty(key, value);
            });
            reply(Map.of("id", cell.id(), "type", "done", "execution_count", executionCount));
        }
    }

    /** Snippet by snippet, as jshell splits the cell; the first failure ends it. */
    private static void runCell(JShell shell, String id, String code) {
        SourceCodeAnalysis analysis = shell.sourceCodeAnalysis();
        String remaining = code;
        while (!remaining.isBlank()) {
            SourceCodeAnalysis.CompletionInfo info = analysis.analyzeCompletion(remaining);
            boolean complete = info.completeness().isComplete() && info.source() != null;
            String source = complete ? info.source() : remaining;
            remaining = complete ? info.remaining() : "";
            SnippetEvent event = mainEvent(shell.eval(source));
            if (stopped) {
                error(id, "InterruptedException", "the execution was interrupted", "");
                return;
            }
            if (event == null) {
                continue;
            }
            if (event.status() == Snippet.Status.REJECTED) {
                error(id, "CompilationException", diagnostics(shell, event.snippet()), source.strip());
                return;
            }
            if (event.exception() != null) {
                thrown(id, event.exception());
                return;
            }
            boolean last = remaining.isBlank();
            if (last && isValue(event.snippet()) && !source.strip().endsWith(";") && event.value() != null) {
                reply(Map.of("id", id, "type", "result", "text", event.value(), "is_main_result", true));
            }
        }
    }

    private static SnippetEvent mainEvent(List<SnippetEvent> events) {
        return events.stream().filter(e -> e.causeSnippet() == null).findFirst().orElse(null);
    }

    /** Expressions have a value worth showing; declarations, statements and imports do not. */
    private static boolean isValue(Snippet snippet) {
        return switch (snippet.subKind()) {
            case TEMP_VAR_EXPRESSION_SUBKIND, VAR_VALUE_SUBKIND, ASSIGNMENT_SUBKIND -> true;
            default -> false;
        };
    }

    private static String diagnostics(JShell shell, Snippet snippet) {
        return shell.diagnostics(snippet).filter(Diag::isError).map(d -> d.getMessage(Locale.ROOT))
                .collect(Collectors.joining("\n"));
    }

    private static void thrown(String id, JShellException exception) {
        String className = exception instanceof EvalException e ? e.getExceptionClassName()
                : exception.getClass().getName();
        String name = className.substring(className.lastIndexOf('.') + 1);
        String message = exception.getMessage() == null ? "" : exception.getMessage();
        StringBuilder traceback = new StringBuilder(className).append(": ").append(message);
        for (StackTraceElement frame : exception.getStackTrace()) {
            String file = frame.getFileName();
            if (file != null && file.startsWith("#")) { // the cells' own frames, not jshell's
                traceback.append("\n\tat <cell ").append(file).append(">:").append(frame.getLineNumber());
            }
        }
        error(id, name, message, traceback.toString());
    }

    private static void error(String id, String name, String value, String traceback) {
        reply(Map.of("id", id, "type", "error", "name", name, "value", value, "traceback", traceback));
    }

    private static synchronized void reply(Map<String, Object> message) {
        StringBuilder json = new StringBuilder("{");
        for (Map.Entry<String, Object> entry : message.entrySet()) {
            if (json.length() > 1) json.append(',');
            appendJson(json, entry.getKey());
            json.append(':');
            Object value = entry.getValue();
            if (value instanceof String text) appendJson(json, text); else json.append(value);
        }
        replies.print(json.append("}\n"));
        replies.flush();
    }

    private static void appendJson(StringBuilder out, String text) {
        out.append('"');
        for (int i = 0; i < text.length(); i++) {
            char c = text.charAt(i);
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\n' -> out.append("\\n");
                case '\r' -> out.append("\\r");
                case '\t' -> out.append("\\t");
                default -> {
                    if (c < 0x20) out.append(String.format("\\u%04x", (int) c)); else out.append(c);
                }
            }
        }
        out.append('"');
    }

    /**
     * System.out/err of the cells. A subclass on purpose: PrintStream.println then writes the text
     * and the line break separately (as in E2B's Java kernel, whose first stdout item of
     * `System.out.println("x")` is "x"), where PrintStream itself would write both at once.
     */
    private static final class CellStream extends PrintStream {
        CellStream(OutputStream relay) {
            super(relay, true, StandardCharsets.UTF_8);
        }
    }

    /** What user code writes to System.out/err: each write one message of the running cell. */
    private static final class Relay extends OutputStream {
        private final String stream;
        private final PrintStream elsewhere; // output outside any cell (e.g. a leftover thread's)

        Relay(String stream, PrintStream elsewhere) {
            this.stream = stream;
            this.elsewhere = elsewhere;
        }

        @Override
        public void write(int b) {
            write(new byte[] {(byte) b}, 0, 1);
        }

        @Override
        public void write(byte[] bytes, int offset, int length) {
            String id = current;
            if (length == 0) {
                return;
            }
            if (id == null) {
                elsewhere.write(bytes, offset, length);
                return;
            }
            String text = new String(bytes, offset, length, StandardCharsets.UTF_8);
            reply(Map.of("id", id, "type", stream, "text", text));
        }
    }
}

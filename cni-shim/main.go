// Command sanderling-cni is the compiled front of Sanderling's CNI plugin.
//
// A container runtime starts the plugin once per ADD; twenty Python interpreters starting at
// once on two cores cost more than the whole reference plugin, so this front does no CNI work
// of its own: it hands the CNI environment and the configuration on stdin to the node agent's
// socket and prints the agent's answer with its exit code. The agent validates the request with
// the same code as the Python shim, so both fronts answer alike. When the configuration names no
// agent socket, or the agent cannot be reached, the Python shim installed beside this binary
// (its name plus "-py") runs instead: it knows the node's default socket and reports an agent
// that is down in the spec's terms.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"strings"
	"time"
)

type reply struct {
	Exit   *int   `json:"exit"`
	Stdout string `json:"stdout"`
}

func main() {
	stdin, _ := readAll()
	var conf struct {
		AgentSocket string `json:"agentSocket"`
		CNIVersion  string `json:"cniVersion"`
	}
	_ = json.Unmarshal(stdin, &conf) // a malformed configuration is the agent's to report
	path := conf.AgentSocket
	if path == "" {
		path = os.Getenv("SANDERLING_CNI_SOCKET")
	}
	if path == "" {
		fallback(stdin)
	}
	conn, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		fallback(stdin)
	}
	_ = conn.SetDeadline(time.Now().Add(60 * time.Second))
	env := map[string]string{}
	for _, kv := range os.Environ() {
		if k, v, ok := strings.Cut(kv, "="); ok && strings.HasPrefix(k, "CNI_") {
			env[k] = v
		}
	}
	request, _ := json.Marshal(map[string]any{"raw": map[string]any{"env": env, "stdin": string(stdin)}})
	if _, err := conn.Write(append(request, '\n')); err != nil {
		fail(conf.CNIVersion, "sanderling agent not reachable at "+path+": "+err.Error())
	}
	line, err := bufio.NewReaderSize(conn, 1<<16).ReadBytes('\n')
	var answer reply
	if len(line) == 0 || json.Unmarshal(line, &answer) != nil || answer.Exit == nil {
		if err == nil {
			err = errors.New("malformed reply")
		}
		fail(conf.CNIVersion, "bad reply from the sanderling agent at "+path+": "+err.Error())
	}
	if answer.Stdout != "" {
		os.Stdout.WriteString(answer.Stdout + "\n")
	}
	os.Exit(*answer.Exit)
}

func readAll() ([]byte, error) {
	var buf bytes.Buffer
	_, err := buf.ReadFrom(os.Stdin)
	return buf.Bytes(), err
}

// fallback runs the Python shim with the same environment and configuration.
func fallback(stdin []byte) {
	self, err := os.Executable()
	if err != nil {
		fail("", "sanderling-cni cannot find itself: "+err.Error())
	}
	cmd := exec.Command(self + "-py")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = bytes.NewReader(stdin), os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			os.Exit(exit.ExitCode())
		}
		fail("", "the agent is not reachable and its Python shim "+self+"-py cannot run: "+err.Error())
	}
	os.Exit(0)
}

// fail prints the spec's error object for a failure of this front itself (code 11: try later).
func fail(version, msg string) {
	switch version {
	case "0.4.0", "1.0.0", "1.1.0":
	default:
		version = "1.1.0"
	}
	out, _ := json.Marshal(map[string]any{"cniVersion": version, "code": 11, "msg": msg})
	os.Stdout.Write(append(out, '\n'))
	os.Exit(1)
}

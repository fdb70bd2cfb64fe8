// gorender renders Ollama Go templates the way Ollama's template package does, for llmforge's checks.
//
// It is shipped as package data (not only under tests/) because `llmforge template --check` needs it at
// run time; the test suite builds and uses this same program. Written from the documented behaviour in
// shared/docs/ollama.md (FuncMap, missingkey=zero, data model, collation, execution modes), std-lib only.
//
// Protocol: stdin is a JSON array of jobs {"template": str, "request": {...Ollama chat request...}};
// stdout is a JSON array of results {"output": str, "error": str}, one per job, in order.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

const outputLimit = 4 << 20 // bytes; a render producing more is an error, not a hang

// ---------------------------------------------------------------- data model

// Arguments are tool-call arguments; printing them gives JSON.
type Arguments map[string]any

func (a Arguments) String() string { return jsonString(a) }

type ToolCallFunction struct {
	Index     int       `json:"index,omitempty"`
	Name      string    `json:"name"`
	Arguments Arguments `json:"arguments"`
}

type ToolCall struct {
	ID       string           `json:"id,omitempty"`
	Function ToolCallFunction `json:"function"`
}

type Message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking,omitempty"`
	Images     []string   `json:"images,omitempty"`
	ToolCalls  []ToolCall `json:"tool_calls,omitempty"`
	ToolName   string     `json:"tool_name,omitempty"`
	ToolCallID string     `json:"tool_call_id,omitempty"`
}

// PropertyType is a JSON-schema type: one name or a list of names.
type PropertyType []string

func (p PropertyType) MarshalJSON() ([]byte, error) {
	if len(p) == 1 {
		return json.Marshal(p[0])
	}
	return json.Marshal([]string(p))
}

func (p *PropertyType) UnmarshalJSON(b []byte) error {
	var one string
	if err := json.Unmarshal(b, &one); err == nil {
		*p = PropertyType{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return err
	}
	*p = many
	return nil
}

func (p PropertyType) String() string {
	if len(p) == 1 {
		return p[0]
	}
	return fmt.Sprint([]string(p))
}

type ToolProperty struct {
	Type        PropertyType  `json:"type,omitempty"`
	Items       any           `json:"items,omitempty"`
	Description string        `json:"description,omitempty"`
	Enum        []any         `json:"enum,omitempty"`
	Properties  ToolPropsMap  `json:"properties,omitempty"`
	Required    []string      `json:"required,omitempty"`
}

func (p ToolProperty) String() string { return jsonString(p) }

// ToolPropsMap prints as JSON, like Ollama's `.Parameters.Properties`.
type ToolPropsMap map[string]ToolProperty

func (m ToolPropsMap) String() string { return jsonString(m) }

// Parameters has no String(): since Ollama v0.14 it prints as a Go struct (the trap the translator avoids).
type Parameters struct {
	Type       string       `json:"type"`
	Defs       any          `json:"$defs,omitempty"`
	Items      any          `json:"items,omitempty"`
	Required   []string     `json:"required,omitempty"`
	Properties ToolPropsMap `json:"properties"`
}

type ToolFunction struct {
	Name        string     `json:"name"`
	Description string     `json:"description,omitempty"`
	Parameters  Parameters `json:"parameters"`
}

type Tool struct {
	Type     string       `json:"type"`
	Items    any          `json:"items,omitempty"`
	Function ToolFunction `json:"function"`
}

func (t Tool) String() string { return jsonString(t) }

type Tools []Tool

func (t Tools) String() string { return jsonString(t) }

type Request struct {
	Messages []Message `json:"messages"`
	Tools    Tools     `json:"tools,omitempty"`
	Think    *bool     `json:"think,omitempty"`
	Prompt   string    `json:"prompt,omitempty"`
	Suffix   string    `json:"suffix,omitempty"`
}

type Job struct {
	Template string  `json:"template"`
	Request  Request `json:"request"`
}

type Result struct {
	Output string `json:"output"`
	Error  string `json:"error,omitempty"`
}

// ---------------------------------------------------------------- FuncMap

func jsonString(v any) string {
	b, _ := json.Marshal(v) // errors ignored, as Ollama does
	return string(b)
}

var funcs = template.FuncMap{
	"json":          func(v any) string { return jsonString(v) },
	"currentDate":   func(args ...string) string { return time.Now().Format("2006-01-02") },
	"yesterdayDate": func(args ...string) string { return time.Now().AddDate(0, 0, -1).Format("2006-01-02") },
}

// ---------------------------------------------------------------- collation

// collate joins all system messages into .System and merges consecutive same-role messages (not tool ones).
func collate(msgs []Message) (string, []Message) {
	var system []string
	var out []Message
	for _, m := range msgs {
		m.Role = strings.ToLower(m.Role)
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(out); n > 0 && out[n-1].Role == m.Role && m.Role != "tool" {
			out[n-1].Content += "\n\n" + m.Content
			continue
		}
		out = append(out, m)
	}
	return strings.Join(system, "\n\n"), out
}

// ---------------------------------------------------------------- Vars()

func collectVars(n parse.Node, vars map[string]bool) {
	switch n := n.(type) {
	case *parse.ListNode:
		if n == nil {
			return
		}
		for _, c := range n.Nodes {
			collectVars(c, vars)
		}
	case *parse.ActionNode:
		collectVars(n.Pipe, vars)
	case *parse.PipeNode:
		if n == nil {
			return
		}
		for _, c := range n.Cmds {
			collectVars(c, vars)
		}
	case *parse.CommandNode:
		for _, a := range n.Args {
			collectVars(a, vars)
		}
	case *parse.FieldNode:
		for _, id := range n.Ident {
			vars[strings.ToLower(id)] = true
		}
	case *parse.VariableNode:
		for _, id := range n.Ident[1:] {
			vars[strings.ToLower(id)] = true
		}
	case *parse.ChainNode:
		collectVars(n.Node, vars)
		for _, id := range n.Field {
			vars[strings.ToLower(id)] = true
		}
	case *parse.IfNode:
		collectBranch(&n.BranchNode, vars)
	case *parse.RangeNode:
		collectBranch(&n.BranchNode, vars)
	case *parse.WithNode:
		collectBranch(&n.BranchNode, vars)
	case *parse.TemplateNode:
		collectVars(n.Pipe, vars)
	}
}

func collectBranch(b *parse.BranchNode, vars map[string]bool) {
	collectVars(b.Pipe, vars)
	collectVars(b.List, vars)
	if b.ElseList != nil {
		collectVars(b.ElseList, vars)
	}
}

// ---------------------------------------------------------------- execution

type limitedBuffer struct{ bytes.Buffer }

var errTooLong = errors.New("rendered output exceeds the size limit")

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if l.Len()+len(p) > outputLimit {
		return 0, errTooLong
	}
	return l.Buffer.Write(p)
}

func render(job Job) (string, error) {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(job.Template)
	if err != nil {
		return "", err
	}
	vars := map[string]bool{}
	collectVars(tmpl.Tree.Root, vars)
	if !vars["messages"] && !vars["response"] {
		tmpl.Tree.Root.Nodes = append(tmpl.Tree.Root.Nodes, &parse.ActionNode{
			NodeType: parse.NodeAction,
			Pipe: &parse.PipeNode{NodeType: parse.NodePipe, Cmds: []*parse.CommandNode{{
				NodeType: parse.NodeCommand, Args: []parse.Node{&parse.FieldNode{NodeType: parse.NodeField, Ident: []string{"Response"}}},
			}}},
		})
	}
	req := job.Request
	think := req.Think != nil && *req.Think
	thinkLevel := ""
	if think {
		thinkLevel = "medium"
	}
	system, msgs := collate(req.Messages)
	base := func() map[string]any {
		return map[string]any{"Think": think, "ThinkLevel": thinkLevel, "IsThinkSet": req.Think != nil, "Response": ""}
	}
	var out limitedBuffer
	if req.Prompt != "" && req.Suffix != "" {
		v := base()
		v["Prompt"], v["Suffix"] = req.Prompt, req.Suffix
		err := tmpl.Execute(&out, v)
		return out.String(), err
	}
	if vars["messages"] {
		v := base()
		v["System"], v["Messages"], v["Tools"] = system, msgs, req.Tools
		err := tmpl.Execute(&out, v)
		return out.String(), err
	}
	return renderLegacy(tmpl, msgs, base, &out)
}

// renderLegacy walks the turns and executes the template once per {System, Prompt, Response} chunk.
func renderLegacy(tmpl *template.Template, msgs []Message, base func() map[string]any, out *limitedBuffer) (string, error) {
	var system, prompt, response string
	flush := func() error {
		v := base()
		v["System"], v["Prompt"], v["Response"] = system, prompt, response
		system, prompt, response = "", "", ""
		return tmpl.Execute(out, v)
	}
	for _, m := range msgs {
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				if err := flush(); err != nil {
					return out.String(), err
				}
			}
			system = m.Content
		case "user":
			if response != "" {
				if err := flush(); err != nil {
					return out.String(), err
				}
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}
	// The open last turn: a copy of the tree cut after the first {{ .Response }}, without FuncMap or missingkey.
	cut := tmpl.Tree.Root.CopyList()
	for i, n := range cut.Nodes {
		vars := map[string]bool{}
		collectVars(n, vars)
		if vars["response"] {
			cut.Nodes = cut.Nodes[:i+1]
			break
		}
	}
	last, err := template.New("").AddParseTree("", &parse.Tree{Name: "", Root: cut})
	if err != nil {
		return out.String(), err
	}
	v := base()
	v["System"], v["Prompt"], v["Response"] = system, prompt, ""
	err = last.Execute(out, v)
	return out.String(), err
}

func main() {
	var jobs []Job
	dec := json.NewDecoder(bufio.NewReader(os.Stdin))
	if err := dec.Decode(&jobs); err != nil {
		fmt.Fprintln(os.Stderr, "gorender: bad input:", err)
		os.Exit(2)
	}
	results := make([]Result, len(jobs))
	for i, job := range jobs {
		text, err := render(job)
		results[i].Output = text
		if err != nil {
			results[i].Error = err.Error()
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(results); err != nil {
		fmt.Fprintln(os.Stderr, "gorender:", err)
		os.Exit(2)
	}
}

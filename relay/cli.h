#pragma once
// The command-line interface: a table of subcommands (see README, "CLI").
// Exit codes: 0 success, 1 failure (the error is printed), 2 wrong invocation (usage printed).

namespace relay {

int RunCli(int argc, char** argv);

}  // namespace relay

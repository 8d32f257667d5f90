// relay: one binary, subcommands. main only hands over to the CLI runner (relay/cli.h).
#include "relay/cli.h"

int main(int argc, char** argv) { return relay::RunCli(argc, argv); }
